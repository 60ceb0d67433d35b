"""Main-thread bridge between MRML nodes and the engine's numpy arrays.

Everything here changes or reads the scene, so it runs on the main thread only. Nodes and
scenes are passed in explicitly (no ``slicer.mrmlScene``, no ``qt``), which lets the pytest suite
run it with the real MRML classes of the ``slicer-core`` wheel.

Arrays are numpy ``(z, y, x)`` = Slicer's KJI order; array axis 0 is the volume's k index,
1 is j, 2 is i. Per-slice writes add one plane of the engine's result to one segment, on the
grid that segment is stored on (``MODE_MERGE_MASK``, ``slicer.md`` section 2.2), and touch
nothing else: no other segment, no layer resampled, no voxel removed. An update replaces the
planes it recomputes (:class:`SegmentPlaneReplacer`), again one plane of one segment at a time.
Reads add no node to the scene.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from oflsam2.errors import InputError

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_UNDO_NODE_TAG = "OFLSAM2Undo"


# ---------------------------------------------------------------------------------------------
# Volumes


@dataclass(frozen=True)
class VolumeGeometry:
    """The voxel grid of a volume node: ``shape`` (z, y, x) and its 4x4 IJK->RAS matrix."""

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray  # (4, 4)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def direction_lps(self) -> np.ndarray:
        """(3, 3) unit index axes i, j, k as columns, in ITK's LPS convention (for ``resolve_axis``)."""
        directions = self.ijk_to_ras[:3, :3] / np.asarray(self.spacing_xyz)
        return _LPS_FROM_RAS @ directions

    def vtk_matrix(self) -> vtk.vtkMatrix4x4:
        return _vtk_matrix(self.ijk_to_ras)

    def plane_shape(self, axis: int) -> tuple[int, int]:
        return tuple(n for a, n in enumerate(self.shape) if a != axis)

    def plane_extent(self, axis: int, index: int) -> list[int]:
        """VTK extent [i0, i1, j0, j1, k0, k1] of plane ``index`` along array ``axis``."""
        if axis not in (0, 1, 2):
            raise ValueError(f"Array axis must be 0, 1 or 2; got {axis!r}.")
        if not 0 <= index < self.shape[axis]:
            raise ValueError(f"Plane {index} is outside the volume (0..{self.shape[axis] - 1} along axis {axis}).")
        z, y, x = self.shape
        extent = [0, x - 1, 0, y - 1, 0, z - 1]
        vtk_axis = 2 - axis  # array (z, y, x) -> VTK (i, j, k)
        extent[2 * vtk_axis] = extent[2 * vtk_axis + 1] = int(index)
        return extent


def volume_geometry(volume_node) -> VolumeGeometry:
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError("Select a volume that holds image data (the selected volume is empty).")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, z = image.GetDimensions()
    if min(x, y, z) < 1 or image.GetPointData().GetScalars() is None:
        raise InputError(f"Select a volume that holds image data (volume {volume_node.GetName()!r} has no voxels).")
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if not np.all(np.isfinite(ijk_to_ras)) or np.any(spacing <= 1e-9):
        raise InputError(
            f"Volume {volume_node.GetName()!r} has a zero or invalid voxel spacing "
            f"({', '.join(f'{s:g}' for s in spacing)} mm along i, j, k). Set the real spacing in the "
            "Volumes module (Volume Information > Image Spacing) and run again."
        )
    if abs(np.linalg.det(ijk_to_ras[:3, :3] / spacing)) < 1e-6:  # two index axes along one line: no 3-D grid
        raise InputError(
            f"Volume {volume_node.GetName()!r} has an invalid orientation: two of its IJK directions are parallel. "
            "Fix the IJK to RAS directions (Volumes module > Volume Information, or reload the file) and run again."
        )
    return VolumeGeometry((z, y, x), ijk_to_ras)


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def _numpy_matrix(image) -> np.ndarray:
    """(4, 4) IJK->RAS of a ``vtkOrientedImageData``."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def check_scalar_volume(volume_node) -> VolumeGeometry:
    """The geometry of a volume that holds one value per voxel, or a clear error."""
    geometry = volume_geometry(volume_node)
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"Volume {volume_node.GetName()!r} has several components per voxel (a colour or vector "
            "image); select a scalar CT/MR volume, or extract one component with the Vector to Scalar Volume module."
        )
    return geometry


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


# ---------------------------------------------------------------------------------------------
# Segments


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


@dataclass(frozen=True)
class SegmentGrid:
    """A voxel lattice: VTK ``extent`` [i0, i1, j0, j1, k0, k1] and its 4x4 IJK->RAS matrix.

    Arrays on a grid are (z, y, x) = (k - k0, j - j0, i - i0). A segment is written on its own
    grid (:func:`segment_grid`), so that Slicer never resamples the labelmap layer it shares
    with other segments.
    """

    extent: tuple[int, int, int, int, int, int]
    ijk_to_ras: np.ndarray  # (4, 4)

    @classmethod
    def of_volume(cls, geometry: VolumeGeometry) -> "SegmentGrid":
        z, y, x = geometry.shape
        return cls((0, x - 1, 0, y - 1, 0, z - 1), geometry.ijk_to_ras)

    @property
    def shape(self) -> tuple[int, int, int]:
        i0, i1, j0, j1, k0, k1 = self.extent
        return (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)

    def same_lattice(self, ijk_to_ras: np.ndarray) -> bool:
        return bool(np.allclose(self.ijk_to_ras, ijk_to_ras, rtol=0.0, atol=1e-6))

    def image(self, voxels: np.ndarray, extent: Sequence[int] | None = None):
        """A uint8 ``vtkOrientedImageData`` of (z, y, x) ``voxels`` covering ``extent`` (default: the grid)."""
        extent = list(extent if extent is not None else self.extent)
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        flat = np.ascontiguousarray(voxels, dtype=np.uint8).ravel()
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        image.SetImageToWorldMatrix(_vtk_matrix(self.ijk_to_ras))
        return image

    def read(self, labelmap) -> np.ndarray:
        """A binary ``vtkOrientedImageData`` (any lattice or extent) as a bool (z, y, x) array on this grid."""
        out = np.zeros(self.shape, dtype=bool)
        if _is_empty(labelmap) or labelmap.GetPointData().GetScalars() is None:
            return out
        if not self.same_lattice(_numpy_matrix(labelmap)):
            reference = slicer.vtkOrientedImageData()
            reference.SetExtent(*self.extent)
            reference.SetImageToWorldMatrix(_vtk_matrix(self.ijk_to_ras))
            resampled = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    labelmap, reference, resampled, False, True):
                raise InputError("Could not resample a segment onto the volume grid.")
            labelmap = resampled
            if _is_empty(labelmap):
                return out
        extent = labelmap.GetExtent()
        i0, i1, j0, j1, k0, k1 = extent
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        voxels = voxels.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) > 0
        own = self.extent
        low = [max(extent[2 * a], own[2 * a]) for a in range(3)]  # i, j, k
        high = [min(extent[2 * a + 1], own[2 * a + 1]) for a in range(3)]
        if any(lo > hi for lo, hi in zip(low, high)):
            return out
        source = tuple(slice(low[a] - extent[2 * a], high[a] - extent[2 * a] + 1) for a in (2, 1, 0))
        target = tuple(slice(low[a] - own[2 * a], high[a] - own[2 * a] + 1) for a in (2, 1, 0))
        out[target] = voxels[source]
        return out

    def plane_voxels(self, geometry: VolumeGeometry, axis: int, index: int, plane: np.ndarray):
        """The grid voxels whose nearest volume voxel lies on plane ``index`` along array ``axis``.

        Returns ``(extent, hit, value)``: the VTK extent of the smallest box of grid voxels that
        holds them, a bool (z, y, x) array of those voxels in that box, and the value of
        ``plane`` (2-D bool, the volume plane) at each of them. None when no grid voxel maps to
        the plane (the segmentation's grid does not reach it). On the volume's own grid this
        is exactly the plane.
        """
        grid_to_volume = np.linalg.inv(geometry.ijk_to_ras) @ self.ijk_to_ras
        size_ijk = geometry.shape[::-1]
        vtk_axis = 2 - axis
        shift = np.rint(grid_to_volume[:3, 3])
        if np.allclose(grid_to_volume[:3, :3], np.eye(3), atol=1e-6) and np.allclose(grid_to_volume[:3, 3], shift, atol=1e-6):
            return self._shifted_plane_voxels(shift.astype(int), size_ijk, vtk_axis, index, plane)
        volume_to_grid = np.linalg.inv(grid_to_volume)
        low = [-0.5] * 3
        high = [n - 0.5 for n in size_ijk]
        low[vtk_axis], high[vtk_axis] = index - 0.5, index + 0.5
        corners = np.array([[c[0], c[1], c[2], 1.0] for c in np.array(np.meshgrid(*zip(low, high))).reshape(3, -1).T])
        on_grid = (volume_to_grid @ corners.T)[:3]
        first = np.maximum(np.floor(on_grid.min(axis=1)).astype(int), self.extent[0::2])
        last = np.minimum(np.ceil(on_grid.max(axis=1)).astype(int), self.extent[1::2])
        if np.any(first > last):
            return None
        # Walk the grid axis most aligned with the plane's normal: along it, each grid column meets
        # the one-voxel-thick slab in a few voxels, found directly (not by testing the whole box).
        normal = grid_to_volume[vtk_axis, :3]
        along = int(np.argmax(np.abs(normal)))
        across = [a for a in range(3) if a != along]
        columns_p, columns_q = np.meshgrid(*(np.arange(first[a], last[a] + 1) for a in across), indexing="ij")
        rest = normal[across[0]] * columns_p + normal[across[1]] * columns_q + grid_to_volume[vtk_axis, 3]
        bounds = np.stack([(index - 0.5 - rest) / normal[along], (index + 0.5 - rest) / normal[along]])
        start = np.ceil(bounds.min(axis=0) - 1e-9).astype(np.int64)
        steps = int(np.max(np.floor(bounds.max(axis=0)) - start)) + 2
        in_plane = [2 - a for a in range(3) if a != axis]  # the plane's array axes, as i/j/k columns
        plane = np.asarray(plane, dtype=bool)
        found_ijk, found_value = [], []
        for step in range(steps):
            ijk = np.empty(columns_p.shape + (3,), dtype=np.int64)
            ijk[..., along] = start + step
            ijk[..., across[0]], ijk[..., across[1]] = columns_p, columns_q
            volume_ijk = np.floor(ijk @ grid_to_volume[:3, :3].T + grid_to_volume[:3, 3] + 0.5).astype(np.int64)
            hit = (ijk[..., along] >= first[along]) & (ijk[..., along] <= last[along])
            hit &= np.all((volume_ijk >= 0) & (volume_ijk < np.asarray(size_ijk)), axis=-1)
            hit &= volume_ijk[..., vtk_axis] == index
            found_ijk.append(ijk[hit])
            found_value.append(plane[volume_ijk[hit][:, in_plane[0]], volume_ijk[hit][:, in_plane[1]]])
        ijk = np.concatenate(found_ijk)
        if not len(ijk):
            return None
        low, high = ijk.min(axis=0), ijk.max(axis=0)
        shape = tuple(int(n) for n in (high - low + 1)[::-1])  # (k, j, i)
        where = tuple((ijk - low)[:, a] for a in (2, 1, 0))
        hit = np.zeros(shape, dtype=bool)
        hit[where] = True
        value = np.zeros(shape, dtype=bool)
        value[where] = np.concatenate(found_value)
        extent = [int(v) for pair in zip(low, high) for v in pair]
        return extent, hit, value

    def _shifted_plane_voxels(self, shift: np.ndarray, size_ijk, vtk_axis: int, index: int, plane: np.ndarray):
        """:meth:`plane_voxels` when the grid is the volume's lattice moved by whole voxels
        (the volume's own grid, or a cropped one): the plane itself, cut to the grid."""
        first = np.array([-s for s in shift])  # grid index of volume index 0
        low = np.maximum(first, self.extent[0::2])
        high = np.minimum(first + np.asarray(size_ijk) - 1, self.extent[1::2])
        low[vtk_axis] = high[vtk_axis] = index - shift[vtk_axis]
        if np.any(low > high) or not self.extent[2 * vtk_axis] <= low[vtk_axis] <= self.extent[2 * vtk_axis + 1]:
            return None
        volume_low, volume_high = low + shift, high + shift  # the same box in volume indices
        in_plane = [a for a in (2, 1, 0) if a != vtk_axis]  # the plane's rows and columns as i/j/k
        rows = slice(volume_low[in_plane[0]], volume_high[in_plane[0]] + 1)
        columns = slice(volume_low[in_plane[1]], volume_high[in_plane[1]] + 1)
        value = np.expand_dims(np.asarray(plane, dtype=bool)[rows, columns], 2 - vtk_axis)
        extent = [int(v) for pair in zip(low, high) for v in pair]
        return extent, np.ones(value.shape, dtype=bool), value


def segment_grid(segmentation_node, segment_id: str, geometry: VolumeGeometry) -> SegmentGrid:
    """The grid that segment ``segment_id`` is stored on: its labelmap layer's lattice, over the
    segmentation's reference geometry when that lies on the same lattice (else over the layer's
    own extent). A segment with no voxels yet uses the reference geometry, or the volume's grid."""
    segmentation = segmentation_node.GetSegmentation()
    reference = None
    serialized = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if serialized:
        image = slicer.vtkOrientedImageData()
        if slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image, False) and not _is_empty(image):
            reference = SegmentGrid(tuple(image.GetExtent()), _numpy_matrix(image))
    segment = segmentation.GetSegment(segment_id)
    layer = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()) if segment else None
    if layer is not None and not _is_empty(layer) and layer.GetPointData().GetScalars() is not None:
        matrix = _numpy_matrix(layer)
        if reference is not None and reference.same_lattice(matrix):
            return reference
        return SegmentGrid(tuple(layer.GetExtent()), matrix)
    return reference if reference is not None else SegmentGrid.of_volume(geometry)


def _layer_matrix(segmentation_node, segment_id: str):
    """IJK->RAS of the labelmap layer holding ``segment_id`` (None while the segment is empty)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    layer = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()) if segment else None
    if layer is None or _is_empty(layer) or layer.GetPointData().GetScalars() is None:
        return None
    return _numpy_matrix(layer)


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


# ---------------------------------------------------------------------------------------------
# Per-slice writes


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
        layer = _layer_matrix(self.segmentation_node, segment_id)
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
        if layer is None or _is_empty(layer) or layer.GetPointData().GetScalars() is None:
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


# ---------------------------------------------------------------------------------------------
# Snapshot, status and undo


class SegmentSnapshot:
    """Copies of target segments taken before a run; ``restore`` puts back what the run wrote.

    This is what "cancel leaves the segmentation as it was" rests on. With ``geometry`` (the
    volume grid the run writes planes of), the run reports each plane with :meth:`record_plane`
    before adding it, and :meth:`restore` removes the voxels the run added (mapped onto each
    segment's own grid as the writers map them, and not set before the run) and keeps every other
    voxel as it is now: edits the user made during the run survive, except on voxels the run
    itself added. Runs only add voxels to the target segments (see :class:`SegmentSliceWriter`),
    so this is exact, and the targets are all a restore has to cover.

    ``replaces``: the run replaces planes (an update, :class:`SegmentPlaneReplacer`): each voxel
    of a written plane that still holds what the run wrote gets its value from before the run
    back; a voxel the user changed since, and every voxel of the planes the run did not write,
    stay as they are now. Without ``geometry``, :meth:`restore` puts the whole segments back.
    """

    def __init__(self, segmentation_node, segment_ids: Sequence[str], geometry: VolumeGeometry | None = None,
                 replaces: bool = False):
        self.segmentation_node = segmentation_node
        self.geometry = geometry
        self.replaces = replaces
        self._labelmaps = {}
        self._statuses = {}
        self._planes: dict[str, dict] = {s: {} for s in segment_ids}  # (axis, index) -> bool plane written
        self._grids: dict[str, SegmentGrid] = {}
        segmentation = segmentation_node.GetSegmentation()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        for segment_id in segment_ids:
            copy = slicer.vtkOrientedImageData()
            if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, copy):
                raise InputError(f"Could not read segment {segment_id!r} of {segmentation_node.GetName()!r} to back it up.")
            self._labelmaps[segment_id] = copy
            self._statuses[segment_id] = logic.GetSegmentStatus(segmentation.GetSegment(segment_id))
            if geometry is not None:
                self._grids[segment_id] = segment_grid(segmentation_node, segment_id, geometry)

    @property
    def segment_ids(self) -> list[str]:
        return list(self._labelmaps)

    def record_plane(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> None:
        """The run is about to add ``plane`` (2-D, on the volume grid) as plane ``index`` along
        ``axis`` of ``segment_id``."""
        written = self._planes[segment_id]
        key = (axis, index)
        plane = np.asarray(plane) > 0
        written[key] = written[key] | plane if key in written and not self.replaces else plane

    def mark_in_progress(self) -> None:
        self._set_statuses({s: slicer.vtkSlicerSegmentationsModuleLogic.InProgress for s in self._labelmaps})

    def restore_statuses(self) -> None:
        self._set_statuses(self._statuses)

    def restore(self) -> None:
        """Put back each target segment's written voxels (or whole segment, without ``geometry``)
        and its status. Segments deleted meanwhile are skipped."""
        segmentation = self.segmentation_node.GetSegmentation()
        for segment_id, labelmap in self._labelmaps.items():
            if segmentation.GetSegment(segment_id) is None:
                continue
            if self.geometry is None:
                self._restore_whole(segment_id, labelmap)
            elif self._planes[segment_id]:
                self._restore_planes(segment_id, labelmap)
        self.restore_statuses()

    def _restore_planes(self, segment_id: str, labelmap) -> None:
        grid = self._grids[segment_id]
        before = grid.read(labelmap)
        current_image = slicer.vtkOrientedImageData()
        self.segmentation_node.GetBinaryLabelmapRepresentation(segment_id, current_image)
        current = grid.read(current_image)
        restored = current.copy()
        k0, j0, i0 = grid.extent[4], grid.extent[2], grid.extent[0]
        for (axis, index), plane in self._planes[segment_id].items():
            found = grid.plane_voxels(self.geometry, axis, index, plane)
            if found is None:
                continue
            extent, hit, value = found
            box = (slice(extent[4] - k0, extent[5] - k0 + 1), slice(extent[2] - j0, extent[3] - j0 + 1),
                   slice(extent[0] - i0, extent[1] - i0 + 1))
            if self.replaces:  # voxels still as the run wrote them get their old value; the user's changes stay
                kept = hit & (current[box] == value)
                restored[box][kept] = before[box][kept]
            else:
                restored[box][value & ~before[box]] = False  # what the run added; the rest is the user's
        if np.array_equal(restored, current):
            return
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        logic.SetBinaryLabelmapToSegment(grid.image(restored), self.segmentation_node, segment_id, logic.MODE_REPLACE)

    def _restore_whole(self, segment_id: str, labelmap) -> None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if _is_empty(labelmap):  # was empty: clear what the run wrote (VTK rejects empty extents)
            current = slicer.vtkOrientedImageData()
            self.segmentation_node.GetBinaryLabelmapRepresentation(segment_id, current)
            if _is_empty(current):
                return
            labelmap = _zeros_like(current)
        logic.SetBinaryLabelmapToSegment(labelmap, self.segmentation_node, segment_id, logic.MODE_REPLACE)

    def _set_statuses(self, statuses: dict) -> None:
        segmentation = self.segmentation_node.GetSegmentation()
        for segment_id, status in statuses.items():
            segment = segmentation.GetSegment(segment_id)
            if segment is not None:
                slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segment, status)


class EditWatch:
    """Notices voxel edits of a segmentation that are not the run's own writes.

    Observes the segmentation's source-representation, segment-added and segment-removed
    events; changes made inside :meth:`own_changes` (the run's writes and restores) do not
    count. ``edited`` tells "Undo last run" whether undoing would discard the user's work.
    """

    EVENTS = ("SourceRepresentationModified", "SegmentAdded", "SegmentRemoved")

    def __init__(self, segmentation_node):
        self.segmentation_node = segmentation_node
        self.edited = False
        self._own = 0
        self._segmentation = segmentation_node.GetSegmentation()
        self._tags = [self._segmentation.AddObserver(getattr(slicer.vtkSegmentation, e), self._on_change) for e in self.EVENTS]

    def _on_change(self, caller, event) -> None:
        if not self._own:
            self.edited = True

    @contextlib.contextmanager
    def own_changes(self):
        self._own += 1
        try:
            yield
        finally:
            self._own -= 1

    def stop(self) -> None:
        for tag in self._tags:
            self._segmentation.RemoveObserver(tag)
        self._tags = []


def _is_empty(image) -> bool:
    extent = image.GetExtent()
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _zeros_like(image):
    zeros = slicer.vtkOrientedImageData()
    zeros.SetExtent(image.GetExtent())
    zeros.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    zeros.GetPointData().GetScalars().Fill(0)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    zeros.SetImageToWorldMatrix(matrix)
    return zeros


class UndoRecorder:
    """One undo state per run through ``vtkSlicerSegmentEditorLogic`` (Slicer >= 5.10).

    The editor logic keeps its own segmentation history, so a run is undone with :meth:`undo`
    (the module's "Undo last run"), separately from the Segment Editor's own undo stack.
    """

    def __init__(self, scene):
        self.scene = scene
        self._logic = None
        self._segmentation_node = None

    @staticmethod
    def available() -> bool:
        return hasattr(slicer, "vtkSlicerSegmentEditorLogic")

    def save(self, segmentation_node, source_volume_node=None) -> bool:
        """Snapshot the whole segmentation before a run; False when undo is unavailable."""
        if not self.available():
            return False
        logic = self._editor_logic()
        logic.SetSegmentationNode(segmentation_node)
        if source_volume_node is not None:
            logic.SetSourceVolumeNode(source_volume_node)
        self._segmentation_node = segmentation_node
        return bool(logic.SaveStateForUndo())

    def can_undo(self) -> bool:
        node = self._segmentation_node
        return self._logic is not None and node is not None and node.GetScene() is self.scene

    def undo(self) -> bool:
        """Revert the segmentation of the last recorded run to its state before that run."""
        if not self.can_undo():
            return False
        self._logic.Undo()
        self._segmentation_node = None  # one undo per recorded run
        return True

    def _editor_logic(self):
        editor_node = self._editor_node()
        if self._logic is None:
            self._logic = slicer.vtkSlicerSegmentEditorLogic()
            self._logic.SetMRMLScene(self.scene)
        if self._logic.GetSegmentEditorNode() is not editor_node:
            self._logic.SetSegmentEditorNode(editor_node)
        return self._logic

    def _editor_node(self):
        node = self.scene.GetSingletonNode(_UNDO_NODE_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            if not self.scene.IsNodeClassRegistered("vtkMRMLSegmentEditorNode"):
                self.scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag(_UNDO_NODE_TAG)
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            node = self.scene.AddNode(node)
        return node
