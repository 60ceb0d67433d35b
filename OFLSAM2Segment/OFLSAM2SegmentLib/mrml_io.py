"""Main-thread bridge between MRML nodes and the engine's numpy arrays.

Everything here changes or reads the scene, so it runs on the main thread only. Nodes and
scenes are passed in explicitly (no ``slicer.mrmlScene``, no ``qt``), which lets the pytest suite
run it with the real MRML classes of the ``slicer-core`` wheel.

Arrays are numpy ``(z, y, x)`` = Slicer's KJI order; array axis 0 is the volume's k index,
1 is j, 2 is i. Per-slice writes follow the recipe verified in ``slicer.md`` section 2.2: they
touch one plane of one segment and nothing else.
"""

from __future__ import annotations

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
        matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for column in range(4):
                matrix.SetElement(row, column, float(self.ijk_to_ras[row, column]))
        return matrix

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
    return VolumeGeometry((z, y, x), ijk_to_ras)


def volume_array(volume_node) -> tuple[np.ndarray, VolumeGeometry]:
    """A float32 copy (z, y, x) of a scalar volume and its geometry; never a view of the node."""
    geometry = volume_geometry(volume_node)
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"Volume {volume_node.GetName()!r} has several components per voxel (a colour or vector "
            "image); select a scalar CT/MR volume, or extract one component with the Vector to Scalar Volume module."
        )
    return np.array(slicer.util.arrayFromVolume(volume_node), dtype=np.float32, copy=True), geometry


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
        raise InputError(f"Segmentation {segmentation_node.GetName()!r} has no segment(s) {missing}; select existing segments.")
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
    own geometry (exported through a temporary labelmap with the volume as reference)."""
    check_same_space(volume_node, segmentation_node)
    scene = volume_node.GetScene()
    if scene is None:
        raise InputError(f"Volume {volume_node.GetName()!r} is not in a scene.")
    shape = volume_geometry(volume_node).shape
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetHideFromEditors(True)
    labelmap.SetSaveWithScene(False)
    scene.AddNode(labelmap)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    try:
        masks = {}
        for segment_id in segment_ids:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node):
                raise InputError(f"Could not read segment {segment_id!r} of {segmentation_node.GetName()!r} on the volume grid.")
            array = slicer.util.arrayFromVolume(labelmap)
            if array.shape != shape:
                raise InputError(f"Segment {segment_id!r} was exported with shape {array.shape}, the volume has {shape}.")
            masks[segment_id] = array > 0
        return masks
    finally:
        scene.RemoveNode(labelmap)


def annotated_planes(mask: np.ndarray, axis: int) -> list[int]:
    """Indices along ``axis`` of the planes of a bool (z, y, x) mask that contain any voxel."""
    from oflsam2.volume import annotated_slices

    return annotated_slices(np.asarray(mask, dtype=np.uint8), 1, axis)


# ---------------------------------------------------------------------------------------------
# Per-slice writes


def plane_image(geometry: VolumeGeometry, axis: int, index: int, plane: np.ndarray) -> tuple[object, list[int]]:
    """A one-plane ``vtkOrientedImageData`` (uint8) on the volume grid, and its extent.

    ``plane`` is 2-D: (y, x) for axis 0, (z, x) for axis 1, (z, y) for axis 2.
    """
    plane = np.asarray(plane)
    expected = geometry.plane_shape(axis)
    if plane.shape != expected:
        raise ValueError(f"A plane along axis {axis} must have shape {expected}; got {plane.shape}.")
    extent = geometry.plane_extent(axis, index)
    voxels = np.ascontiguousarray(np.expand_dims(plane, axis) > 0, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(geometry.vtk_matrix())
    return image, extent


class SegmentSliceWriter:
    """Module path: replace one plane of one segment (MODE_MERGE_MIN with zeros, then
    MODE_MERGE_MASK with the mask), leaving other planes, other segments and shared layers intact.
    MODE_REPLACE would erase the rest of the segment and MODE_MERGE_MAX would paint the raw 1s
    into whichever segment owns label value 1 on a shared layer."""

    def __init__(self, segmentation_node, geometry: VolumeGeometry):
        self.segmentation_node = segmentation_node
        self.geometry = geometry

    def write(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        zeros, extent = plane_image(self.geometry, axis, index, np.zeros(self.geometry.plane_shape(axis), np.uint8))
        mask, _ = plane_image(self.geometry, axis, index, plane)
        ok = logic.SetBinaryLabelmapToSegment(zeros, self.segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent)
        ok = ok and logic.SetBinaryLabelmapToSegment(mask, self.segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent)
        if not ok:
            raise RuntimeError(f"Could not write plane {index} (axis {axis}) of segment {segment_id!r}.")


class EditorSliceWriter:
    """Segment Editor path: ``Remove`` with an all-ones plane, then ``Add`` with the mask,
    bypassing the editor's masking and overwrite settings (``Set`` would replace the whole
    segment). The modifier image covers one plane only, and the editor changes nothing outside
    the modifier's extent.

    ``modify(segment_id, image, mode)`` is the effect's ``modifySegmentByLabelmap(segmentation,
    segment_id, image, mode, bypassMasking=True)`` (or ``vtkSlicerSegmentEditorLogic``'s).
    """

    def __init__(self, modify: Callable, remove_mode, add_mode, geometry: VolumeGeometry):
        self.modify = modify
        self.remove_mode = remove_mode
        self.add_mode = add_mode
        self.geometry = geometry

    def write(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> None:
        ones, _ = plane_image(self.geometry, axis, index, np.ones(self.geometry.plane_shape(axis), np.uint8))
        mask, _ = plane_image(self.geometry, axis, index, plane)
        self.modify(segment_id, ones, self.remove_mode)
        self.modify(segment_id, mask, self.add_mode)


# ---------------------------------------------------------------------------------------------
# Snapshot, status and undo


class SegmentSnapshot:
    """Copies of target segments taken before a run; ``restore`` puts them back exactly.

    This is what "cancel leaves the segmentation as it was" rests on: slices are written while
    the run progresses, and on cancel or error every target segment gets its old voxels and
    status back. Other segments are not touched.
    """

    def __init__(self, segmentation_node, segment_ids: Sequence[str]):
        self.segmentation_node = segmentation_node
        self._labelmaps = {}
        self._statuses = {}
        segmentation = segmentation_node.GetSegmentation()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        for segment_id in segment_ids:
            copy = slicer.vtkOrientedImageData()
            if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, copy):
                raise InputError(f"Could not read segment {segment_id!r} of {segmentation_node.GetName()!r} to back it up.")
            self._labelmaps[segment_id] = copy
            self._statuses[segment_id] = logic.GetSegmentStatus(segmentation.GetSegment(segment_id))

    @property
    def segment_ids(self) -> list[str]:
        return list(self._labelmaps)

    def mark_in_progress(self) -> None:
        self._set_statuses({s: slicer.vtkSlicerSegmentationsModuleLogic.InProgress for s in self._labelmaps})

    def restore_statuses(self) -> None:
        self._set_statuses(self._statuses)

    def restore(self) -> None:
        """Put back each target segment's voxels and status (segments deleted meanwhile are skipped)."""
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        segmentation = self.segmentation_node.GetSegmentation()
        for segment_id, labelmap in self._labelmaps.items():
            if segmentation.GetSegment(segment_id) is None:
                continue
            if _is_empty(labelmap):  # was empty: clear what the run wrote (VTK rejects empty extents)
                current = slicer.vtkOrientedImageData()
                self.segmentation_node.GetBinaryLabelmapRepresentation(segment_id, current)
                if _is_empty(current):
                    continue
                labelmap = _zeros_like(current)
            logic.SetBinaryLabelmapToSegment(labelmap, self.segmentation_node, segment_id, logic.MODE_REPLACE)
        self.restore_statuses()

    def _set_statuses(self, statuses: dict) -> None:
        segmentation = self.segmentation_node.GetSegmentation()
        for segment_id, status in statuses.items():
            segment = segmentation.GetSegment(segment_id)
            if segment is not None:
                slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segment, status)


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
