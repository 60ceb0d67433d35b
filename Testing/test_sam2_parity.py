"""The engine's ``sam2`` method against SAM2's own ``SAM2VideoPredictor`` on a real volume.

Both run the same random-weight SAM2.1-tiny in fp32 on the same float frames and prompts; the
engine drives ``SAM2Base`` internals through its own memory bank, the predictor its own state.
Agreement here is what shows that the driver is faithful.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from oflsam2.api import Engine, LabelSupport, ModelSettings
from oflsam2.features import SliceStack
from oflsam2.volume import apply_preset

LIVER = 1


def predictor_masks(model, normalized, axis, prompts, monkeypatch):
    """Run SAM2VideoPredictor on the same frames: add_new_mask per prompt, forward then reverse."""
    import sam2.sam2_video_predictor as video_predictor

    stack = SliceStack(normalized, axis)
    frames = stack.frames(range(len(stack)), model.image_size, model.device)
    height, width = stack.slice_shape
    monkeypatch.setattr(video_predictor, "load_video_frames", lambda **kwargs: (frames, height, width))
    predictor = model.net
    state = predictor.init_state(video_path="frames-in-memory")
    for index in sorted(prompts):
        predictor.add_new_mask(state, index, 1, torch.from_numpy(prompts[index]))
    logits = np.zeros((len(stack), height, width), dtype=np.float32)
    for reverse in (False, True):
        for index, _, frame_logits in predictor.propagate_in_video(state, reverse=reverse):
            logits[index] = frame_logits[0, 0].cpu().numpy()
    return logits


def record_engine_logits(monkeypatch) -> list[np.ndarray]:
    """Keep every slice's logits the engine thresholds, in the order it produces them."""
    from oflsam2.driver import Sam2Driver

    seen = []
    original = Sam2Driver.to_slice_logits

    def recording(low_res, shape):
        logits = original(low_res, shape)
        seen.append(logits[0].cpu().numpy())
        return logits

    monkeypatch.setattr(Sam2Driver, "to_slice_logits", staticmethod(recording))
    return seen


@pytest.mark.slow
def test_engine_matches_sam2_video_predictor(shared_data, tiny_model, monkeypatch):
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot/image_1.nii.gz"))).astype(np.float32)
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot/label_1.nii.gz"))))
    liver = labels == LIVER
    present = np.flatnonzero(liver.any(axis=(1, 2)))
    annotated = [int(present[len(present) // 3]), int(present[2 * len(present) // 3])]

    engine_logits = record_engine_logits(monkeypatch)
    engine = Engine(ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size), model=tiny_model)
    result = engine.segment(image, [LabelSupport(LIVER, "liver", liver, annotated)], method="sam2", axis=0, preset="mr")
    ours = result.masks[LIVER]

    their_logits = predictor_masks(tiny_model, apply_preset(image, "mr"), 0, {i: liver[i] for i in annotated}, monkeypatch)
    theirs = their_logits > 0

    tracked = [i for i in range(image.shape[0]) if i not in annotated]
    assert theirs[tracked].any(), "the predictor produced no foreground: the comparison would be vacuous"
    differing = int((ours[tracked] != theirs[tracked]).sum())
    assert differing == 0, f"{differing} voxels differ between the engine and SAM2VideoPredictor"
    # Stronger than masks: the logits themselves. The engine renders the prompts first, then
    # tracks forward from the first prompt and backward from it, as the predictor does.
    start = min(annotated)
    order = annotated + [i for i in range(start, image.shape[0]) if i not in annotated] + list(range(start - 1, -1, -1))
    ours_by_slice = dict(zip(order, engine_logits))
    assert len(engine_logits) == image.shape[0]
    worst = max(float(np.abs(ours_by_slice[i] - their_logits[i]).max()) for i in tracked)
    assert worst <= 1e-6, f"logits differ by up to {worst} (the correct driver gives identical logits)"
    # The user's annotation is returned untouched (the predictor returns its own rendering of it).
    assert np.array_equal(ours[annotated], liver[annotated])
