"""Synthetic data for the in-Slicer self-test and the pytest suite (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import slicer

from . import mrml_geometry, mrml_read, mrml_write


def engine_missing_reason() -> str | None:
    """Why the self-tests cannot run here (torch or sam2 missing, as on Slicer's extension build
    machines), or None when they can."""
    import importlib.util

    missing = [name for name in ("torch", "sam2") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"OFLSAM2 self-test skipped: {' and '.join(missing)} not installed in Slicer's Python. Install the PyTorch "
        "extension, run OFLSAM2 once (it offers to install sam2 and the rest), then run the self-test again."
    )


def target_slices(depth: int) -> tuple[int, int]:
    """The two annotated axial slices of a test volume with ``depth`` slices (at 1/3 and 2/3)."""
    return depth // 3, (2 * depth) // 3


def make_annotated_volume(scene, shape=(10, 64, 64)):
    """A noisy volume holding a bright ellipsoid, and a segmentation with two segments:
    ``Target`` (the ellipsoid painted on the two axial slices of :func:`target_slices` only) and ``Other``
    (a strip along one border on every slice, which no run on ``Target`` may touch).

    Returns ``(volume_node, segmentation_node, [target_id, other_id])``.
    """
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = (z / 0.8) ** 2 + (y / 0.5) ** 2 + (x / 0.4) ** 2 <= 1.0
    noise = np.random.default_rng(0).normal(0, 20, shape)
    image = (100 + 600 * inside + noise).astype(np.float32)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "OFLSAM2 test volume")
    slicer.util.updateVolumeFromArray(volume, image)
    volume.SetSpacing(1.0, 1.0, 4.0)

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "OFLSAM2 test segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "Target")
    other = segmentation.GetSegmentation().AddEmptySegment("", "Other")
    if not target or not other:
        raise RuntimeError("Could not create segments: the segmentation converter rules are not registered.")
    writer = mrml_write.SegmentSliceWriter(segmentation, mrml_geometry.volume_geometry(volume))
    for index in target_slices(shape[0]):
        writer.write(target, 0, index, inside[index])
    border = np.zeros(shape[1:], bool)
    border[:, :4] = True
    for index in range(shape[0]):
        writer.write(other, 0, index, border)
    return volume, segmentation, [target, other]


def segment_arrays(segmentation, volume) -> dict:
    """Every segment as a bool (z, y, x) array on the volume grid."""
    ids = list(segmentation.GetSegmentation().GetSegmentIDs())
    return mrml_read.segment_masks(segmentation, ids, volume)
