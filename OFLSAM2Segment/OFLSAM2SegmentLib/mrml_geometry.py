"""Voxel grids on the main thread: a volume node's grid (:class:`VolumeGeometry`) and the grid each
segment is stored on (:class:`SegmentGrid`), with the mapping of a volume plane onto it.

Arrays are numpy ``(z, y, x)`` = Slicer's KJI order; array axis 0 is the volume's k index,
1 is j, 2 is i. Nodes are passed in explicitly (no ``slicer.mrmlScene``, no ``qt``), so the
pytest suite runs this with the real MRML classes of the ``slicer-core`` wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from oflsam2.errors import InputError

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


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
        return vtk_matrix_of(self.ijk_to_ras)

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


def vtk_matrix_of(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def numpy_matrix(image) -> np.ndarray:
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
        image.SetImageToWorldMatrix(vtk_matrix_of(self.ijk_to_ras))
        return image

    def read(self, labelmap) -> np.ndarray:
        """A binary ``vtkOrientedImageData`` (any lattice or extent) as a bool (z, y, x) array on this grid."""
        out = np.zeros(self.shape, dtype=bool)
        if is_empty(labelmap) or labelmap.GetPointData().GetScalars() is None:
            return out
        if not self.same_lattice(numpy_matrix(labelmap)):
            reference = slicer.vtkOrientedImageData()
            reference.SetExtent(*self.extent)
            reference.SetImageToWorldMatrix(vtk_matrix_of(self.ijk_to_ras))
            resampled = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    labelmap, reference, resampled, False, True):
                raise InputError("Could not resample a segment onto the volume grid.")
            labelmap = resampled
            if is_empty(labelmap):
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
        if slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image, False) and not is_empty(image):
            reference = SegmentGrid(tuple(image.GetExtent()), numpy_matrix(image))
    segment = segmentation.GetSegment(segment_id)
    layer = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()) if segment else None
    if layer is not None and not is_empty(layer) and layer.GetPointData().GetScalars() is not None:
        matrix = numpy_matrix(layer)
        if reference is not None and reference.same_lattice(matrix):
            return reference
        return SegmentGrid(tuple(layer.GetExtent()), matrix)
    return reference if reference is not None else SegmentGrid.of_volume(geometry)


def layer_matrix(segmentation_node, segment_id: str):
    """IJK->RAS of the labelmap layer holding ``segment_id`` (None while the segment is empty)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    layer = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()) if segment else None
    if layer is None or is_empty(layer) or layer.GetPointData().GetScalars() is None:
        return None
    return numpy_matrix(layer)


def is_empty(image) -> bool:
    extent = image.GetExtent()
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]
