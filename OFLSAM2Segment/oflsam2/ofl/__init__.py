"""OFL-SAM2's trainable parts, pure torch: the few-shot learner (τ by unrolled steepest
descent, learnable ridge scale λ), the channel lift and adaptive fusion module, and the
adapter files that carry them from one run to the next."""

from .adapter import list_adapters, load_adapter, save_adapter
from .fusion import AdaptiveFusion, ChannelLift, sum_fusion
from .learner import FewShotLearner

__all__ = [
    "AdaptiveFusion",
    "ChannelLift",
    "FewShotLearner",
    "list_adapters",
    "load_adapter",
    "save_adapter",
    "sum_fusion",
]
