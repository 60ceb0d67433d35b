"""The SAM2 models of the server's device, shared by every session.

A model is loaded once for all sessions that ask for it (same model, weights and image size)
and kept; past :data:`~.config.MODELS_PER_DEVICE` models the least recently used one is dropped,
and every session lets go of its engine so that the memory is really freed. Used from the
device thread only, which runs one job at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


def default_loader(settings):
    from ..backend import load_sam2

    return load_sam2(settings)


class ModelPool:
    def __init__(self, keep: int, on_evict: Callable[[], None], loader: Callable = default_loader):
        self._keep = keep
        self._on_evict = on_evict
        self._loader = loader
        self._models: OrderedDict = OrderedDict()

    def model(self, settings):
        key = (settings.model, settings.checkpoint, settings.random_weights, settings.image_size, settings.device)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        if len(self._models) >= self._keep:
            self._models.popitem(last=False)
            self._on_evict()
        model = self._models[key] = self._loader(settings)
        return model

    def engine_factory(self, settings):
        """A session's engine: its own feature caches on the shared model."""
        from ..api import Engine

        return Engine(settings, model=self.model(settings))

    def clear(self) -> None:
        self._models.clear()

    @property
    def loaded(self) -> list[str]:
        return [f"{key[0]} @ {key[3]} px" for key in self._models]
