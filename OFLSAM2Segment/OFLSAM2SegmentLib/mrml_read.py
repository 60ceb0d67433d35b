"""Main-thread reads of the scene into numpy arrays: a volume's voxels, its segments on the volume
grid, and which planes of an axis the user drew on (:func:`drawn_support`, :func:`drawing_axis`).

Reads add no node to the scene; they return copies, never views of a node's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import slicer

from oflsam2.errors import InputError

from .mrml_geometry import SegmentGrid, VolumeGeometry, check_scalar_volume, volume_geometry


def volume_array(volume_node) -> tuple[np.ndarray, VolumeGeometry]:
    """A float32 copy (z, y, x) of a scalar volume and its geometry; never a view of the node."""
    geometry = check_scalar_volume(volume_node)
    voxels = slicer.util.arrayFromVolume(volume_node)
    with np.errstate(over="ignore"):  # an overflow is refused just below, with what to do
        image = np.array(voxels, dtype=np.float32, copy=True)
    if voxels.dtype.itemsize > 4 and np.isfinite(voxels).all() and not np.isfinite(image).all():
        raise InputError(
            f"Volume {volume_node.GetName()!r} holds values beyond the float32 range (about 3.4e38), which the model "
            "reads; rescale the volume (e.g. Simple Filters > RescaleIntensity) and run again."
        )
    return image, geometry


def check_same_space(volume_node, segmentation_node) -> None:
    """Volume and segmentation must sit under the same transform (or none): masks are read and
    written on the volume grid in the segmentation's coordinates."""
    if volume_node.GetTransformNodeID() != segmentation_node.GetTransformNodeID():
        raise InputError(
            f"Volume {volume_node.GetName()!r} and segmentation {segmentation_node.GetName()!r} are under "
            "different transforms. Harden the transforms (Transforms module) or place both under the same one."
        )


def check_segments(segmentation_node, segment_ids: Sequence[str]) -> None:
    segmentation = segmentation_node.GetSegmentation()
    missing = [s for s in segment_ids if segmentation.GetSegment(s) is None]
    if missing:
        names = segment_names(segmentation_node)
        by_name = {n: s for s, n in names.items()}
        hints = [f"{m!r} is the name of segment {by_name[m]!r}" for m in missing if m in by_name]
        held = ", ".join(f"{s!r} ({n!r})" for s, n in names.items()) or "none"
        raise InputError(
            f"Segmentation {segmentation_node.GetName()!r} has no segment with ID {', '.join(map(repr, missing))}"
            + (f" ({'; '.join(hints)})" if hints else "") + f". Give segment IDs; its segments are (ID (name)): {held}."
        )
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segment_ids and segmentation.GetSourceRepresentationName() != binary:
        raise InputError(
            f"Segmentation {segmentation_node.GetName()!r} stores {segmentation.GetSourceRepresentationName()!r}; "
            "slices are written as a binary labelmap. Open it once in the Segment Editor (which converts the "
            "source representation to binary labelmap) and run again."
        )


def segment_names(segmentation_node, segment_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Segment ID -> name, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else list(segmentation.GetSegmentIDs())
    return {s: segmentation.GetSegment(s).GetName() for s in ids}


def segment_masks(segmentation_node, segment_ids: Sequence[str], volume_node) -> dict[str, np.ndarray]:
    """Each segment as a bool (z, y, x) array on the volume's grid, whatever the segmentation's
    own geometry (nearest-neighbour resampling of the segment's labelmap).

    Reads add nothing to the scene: no temporary labelmap, display or colour-table node.
    """
    check_same_space(volume_node, segmentation_node)
    geometry = volume_geometry(volume_node)
    volume_grid = SegmentGrid.of_volume(geometry)
    masks = {}
    for segment_id in segment_ids:
        labelmap = slicer.vtkOrientedImageData()
        if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap):
            raise InputError(f"Could not read segment {segment_id!r} of {segmentation_node.GetName()!r} on the volume grid.")
        masks[segment_id] = volume_grid.read(labelmap)
    return masks


@dataclass
class DrawnSupport:
    """A segment's annotation along one axis: what was drawn on that axis's planes.

    ``mask``: the segment on its annotated planes only (bool (z, y, x)); ``planes``: the
    annotated planes along the axis; ``ignored_axes``: array axes of the strokes left out.
    """

    mask: np.ndarray
    planes: list[int]
    ignored_axes: list[int]


def area_planes(mask: np.ndarray, axis: int) -> np.ndarray:
    """Per plane along ``axis``: whether the mask covers an area there (a 2 x 2 block of voxels)
    rather than only lines one voxel wide. Bool (number of planes,)."""
    planes = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    blocks = planes[:, :-1, :-1] & planes[:, 1:, :-1] & planes[:, :-1, 1:] & planes[:, 1:, 1:]
    return blocks.reshape(blocks.shape[0], -1).any(axis=1)


def drawing_axis(masks: Iterable[np.ndarray]) -> int | None:
    """The array axis the user drew the strokes on, for ``axis="auto"``; None when undecided.

    A voxel was drawn on an axis when it lies on a plane of that axis where its segment covers an
    area, and on no such plane of the other two axes (voxels of 3-D pieces and of annotations on
    adjacent slices count for no axis). Each axis gets one vote per plane holding such voxels,
    summed over the segments; a single sagittal stroke across a few axial annotations gives
    sagittal one vote and axial several. A tie (or no vote) is None.
    """
    votes = np.zeros(3, dtype=int)
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        on_area = []
        for axis in range(3):
            selector = [np.newaxis] * 3
            selector[axis] = slice(None)
            on_area.append(mask & area_planes(mask, axis)[tuple(selector)])
        for axis in range(3):
            only_here = on_area[axis] & ~on_area[(axis + 1) % 3] & ~on_area[(axis + 2) % 3]
            votes[axis] += int(np.moveaxis(only_here, axis, 0).reshape(mask.shape[axis], -1).any(axis=1).sum())
    best = np.flatnonzero(votes == votes.max())
    return int(best[0]) if votes.max() > 0 and len(best) == 1 else None


def drawn_support(mask: np.ndarray, axis: int) -> DrawnSupport:
    """The planes of ``axis`` that the user drew on, and the strokes drawn on other axes.

    Rule: a plane of the run's axis is annotated when the segment covers an area on it (at
    least one 2 x 2 block of voxels, see :func:`area_planes`). A stroke drawn on a plane of
    another axis crosses the run's planes as lines one voxel wide, so those planes stay
    unannotated: the stroke's voxels there are left out of the support (and kept in the
    segment: a run only adds voxels). A segment filled in 3-D (e.g. by an earlier run) covers
    an area on each of its planes, so all of them count. ``ignored_axes``: the other axes on
    whose planes the left-out voxels cover an area (both other axes if they only form lines).
    """
    mask = np.asarray(mask, dtype=bool)
    annotated = area_planes(mask, axis)
    selector = [np.newaxis] * 3
    selector[axis] = slice(None)
    kept = mask & annotated[tuple(selector)]
    left_out = mask & ~kept
    ignored = []
    if left_out.any():
        others = [a for a in range(3) if a != axis]
        ignored = [a for a in others if area_planes(left_out, a).any()] or others
    return DrawnSupport(kept, [int(i) for i in np.flatnonzero(annotated)], ignored)
