"""Per-slice writes of the engine's result into the user's segments (main thread).

Each write adds one plane of the engine's result to one segment, on the grid that segment is
stored on (``MODE_MERGE_MASK``, ``slicer.md`` section 2.2), and touches nothing else: no other
segment, no layer resampled, no voxel removed. An update replaces the planes it recomputes
(:class:`SegmentPlaneReplacer`), again one plane of one segment at a time.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import slicer
from vtk.util import numpy_support

from oflsam2.errors import InputError

from .mrml_geometry import SegmentGrid, VolumeGeometry, is_empty, layer_matrix, segment_grid


class _SegmentGridWriter:
    """Maps a plane of the engine's result (on the volume grid) onto the grid a segment is stored
    on: each segment voxel takes the value of its nearest volume voxel. The modifier image is
    always on the segment's own lattice, so Slicer never resamples the labelmap layer the segment
    shares with others, and other segments never change. Writes only add voxels: strokes the user
    made on the plane (or makes during the run) are kept."""

    def __init__(self, segmentation_node, geometry: VolumeGeometry):
        self.segmentation_node = segmentation_node
        self.geometry = geometry
        self._grids: dict[str, SegmentGrid] = {}

    def grid(self, segment_id: str) -> SegmentGrid:
        if segment_id not in self._grids:
            self._grids[segment_id] = segment_grid(self.segmentation_node, segment_id, self.geometry)
        return self._grids[segment_id]

    def modifier(self, segment_id: str, axis: int, index: int, plane: np.ndarray):
        """``(image, extent)``: the plane's voxels to add, on the segment's grid. None: nothing to
        add; False: the plane has voxels to add but lies outside the segment's grid."""
        plane = np.asarray(plane)
        found = self._plane_on_grid(segment_id, axis, index, plane)
        if found is None:
            return False if plane.any() else None
        if not found[2].any():
            return None
        self._check_layer_lattice(segment_id)
        extent, _, value = found
        return self.grid(segment_id).image(value, extent), extent

    def _plane_on_grid(self, segment_id: str, axis: int, index: int, plane: np.ndarray):
        """:meth:`SegmentGrid.plane_voxels` of ``plane`` on the segment's grid, after checking the
        plane and that the segment still exists."""
        self.geometry.plane_extent(axis, index)  # checks axis and index
        if plane.shape != self.geometry.plane_shape(axis):
            raise ValueError(f"A plane along axis {axis} must have shape {self.geometry.plane_shape(axis)}; got {plane.shape}.")
        if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"Segment {segment_id!r} was removed from {self.segmentation_node.GetName()!r} during the run.")
        return self.grid(segment_id).plane_voxels(self.geometry, axis, index, plane > 0)

    def _check_layer_lattice(self, segment_id: str) -> None:
        layer = layer_matrix(self.segmentation_node, segment_id)
        if layer is not None and not self.grid(segment_id).same_lattice(layer):
            raise RuntimeError(
                f"The voxel grid of segment {segment_id!r} changed during the run (was the segmentation "
                "resampled?); the run stopped so that no segment gets resampled."
            )


class SegmentSliceWriter(_SegmentGridWriter):
    """Module path: add the plane's voxels with ``MODE_MERGE_MASK``, which uses the segment's
    label value on a shared layer and moves the segment to its own layer where it would overlap
    another one. ``MODE_REPLACE`` would erase the rest of the segment and ``MODE_MERGE_MAX``
    would paint the raw 1s into whichever segment owns label value 1."""

    def write(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> bool:
        """False when the plane lies outside the segment's grid (nothing could be written)."""
        modifier = self.modifier(segment_id, axis, index, plane)
        if not modifier:
            return modifier is None
        image, extent = modifier
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, self.segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent):
            raise RuntimeError(f"Could not write plane {index} (axis {axis}) of segment {segment_id!r}.")
        return True


class SegmentPlaneReplacer(_SegmentGridWriter):
    """Update path: a recomputed plane replaces what the segment holds on it; nothing else changes.

    ``MODE_REPLACE`` would replace the whole segment whatever the extent (``slicer.md`` section
    2.2), so each plane is replaced in two merges limited to the plane's box on the segment's
    own grid: ``MODE_MERGE_MIN`` with 0 on the voxels to clear (1 elsewhere) removes only this
    segment's voxels there, then ``MODE_MERGE_MASK`` adds the new ones with the segment's label
    value. What the segment holds in the box is read from its labelmap layer in place, so a
    replaced plane costs about what an added one does (no whole-segment copy) and a merge with
    nothing to change is skipped. Other segments are never changed: Slicer moves a segment on a
    shared layer to a layer of its own at its first cleared voxel (``MODE_MERGE_MIN``) or where
    the new mask overlaps another segment, once per segment.

    ``protected``: ``(axis, planes)`` that must never be written (the update's annotated and
    corrected planes); a write there raises, which ends the run and puts the segments back.
    """

    def __init__(self, segmentation_node, geometry: VolumeGeometry, protected: tuple[int, Iterable[int]] | None = None):
        super().__init__(segmentation_node, geometry)
        self.protected = (protected[0], frozenset(int(i) for i in protected[1])) if protected is not None else None

    def write(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> bool:
        """False when the plane lies outside the segment's grid (nothing could be written)."""
        if self.protected is not None and axis == self.protected[0] and index in self.protected[1]:
            raise RuntimeError(f"The update tried to overwrite plane {index} of segment {segment_id!r}, an annotated or "
                               "corrected plane; it was stopped and the segments were put back.")
        plane = np.asarray(plane)
        found = self._plane_on_grid(segment_id, axis, index, plane)
        if found is None:
            return not plane.any()
        self._check_layer_lattice(segment_id)
        extent, hit, value = found
        held = self._held_in(segment_id, extent) & hit
        to_clear, to_add = held & ~value, value & ~held
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        what = f"plane {index} (axis {axis}) of segment {segment_id!r}"
        if to_clear.any():
            self._merge(segment_id, to_clear, extent, logic.MODE_MERGE_MIN, what)
        if to_add.any():
            self._merge(segment_id, to_add, extent, logic.MODE_MERGE_MASK, what)
        return True

    def _merge(self, segment_id: str, changes: np.ndarray, extent: Sequence[int], mode: int, what: str) -> None:
        """Clear (``MODE_MERGE_MIN``) or add (``MODE_MERGE_MASK``) the ``changes`` voxels of the box
        ``extent``. The modifier is cut to the changes' bounding box: Slicer pads the segment's
        labelmap to each modifier's extent and shrinks it back after each merge, two copies of
        the whole labelmap for a modifier reaching beyond it (as a whole plane does)."""
        k, j, i = (np.flatnonzero(changes.any(axis=others)) for others in ((1, 2), (0, 2), (0, 1)))
        box = (slice(k[0], k[-1] + 1), slice(j[0], j[-1] + 1), slice(i[0], i[-1] + 1))
        cut = [extent[0] + i[0], extent[0] + i[-1], extent[2] + j[0], extent[2] + j[-1], extent[4] + k[0], extent[4] + k[-1]]
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        voxels = ~changes[box] if mode == logic.MODE_MERGE_MIN else changes[box]  # MIN: 0 clears, 1 keeps
        if not logic.SetBinaryLabelmapToSegment(self.grid(segment_id).image(voxels, cut), self.segmentation_node,
                                                segment_id, mode, [int(v) for v in cut]):
            raise RuntimeError(f"Could not write {what}.")

    def _held_in(self, segment_id: str, extent: Sequence[int]) -> np.ndarray:
        """The segment's voxels in the box ``extent`` of its grid, bool (z, y, x), read from its
        labelmap layer in place (on a shared layer: the voxels holding its label value)."""
        i0, i1, j0, j1, k0, k1 = extent
        held = np.zeros((k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), dtype=bool)
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        layer = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        if layer is None or is_empty(layer) or layer.GetPointData().GetScalars() is None:
            return held
        own = layer.GetExtent()
        low = [max(extent[2 * a], own[2 * a]) for a in range(3)]  # i, j, k
        high = [min(extent[2 * a + 1], own[2 * a + 1]) for a in range(3)]
        if any(lo > hi for lo, hi in zip(low, high)):
            return held
        voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())
        voxels = voxels.reshape(own[5] - own[4] + 1, own[3] - own[2] + 1, own[1] - own[0] + 1)
        source = tuple(slice(low[a] - own[2 * a], high[a] - own[2 * a] + 1) for a in (2, 1, 0))
        target = tuple(slice(low[a] - extent[2 * a], high[a] - extent[2 * a] + 1) for a in (2, 1, 0))
        held[target] = voxels[source] == segment.GetLabelValue()
        return held


class EditorSliceWriter(_SegmentGridWriter):
    """Segment Editor path: ``Add`` the plane's voxels, on the segment's own grid, through
    ``modify(segment_id, image, mode)``: the effect's ``modifySegmentByLabelmap(segmentation,
    segment_id, image, mode, bypassMasking=True)`` (or ``vtkSlicerSegmentEditorLogic``'s). The
    modifier covers only the plane's voxels; ``Set`` would replace the whole segment."""

    def __init__(self, modify: Callable, add_mode, segmentation_node, geometry: VolumeGeometry):
        super().__init__(segmentation_node, geometry)
        self.modify = modify
        self.add_mode = add_mode

    def write(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> bool:
        """False when the plane lies outside the segment's grid (nothing could be written)."""
        modifier = self.modifier(segment_id, axis, index, plane)
        if modifier:
            self.modify(segment_id, modifier[0], self.add_mode)
        return modifier is not False
