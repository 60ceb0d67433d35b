"""Putting segments back (main thread): the snapshot a run restores on cancel or failure, the watch
that tells the user's edits from the run's own writes, and the one-step "Undo last run"."""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import slicer
import vtk

from oflsam2.errors import InputError

from .mrml_geometry import SegmentGrid, VolumeGeometry, is_empty, segment_grid

_UNDO_NODE_TAG = "OFLSAM2Undo"


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
        if is_empty(labelmap):  # was empty: clear what the run wrote (VTK rejects empty extents)
            current = slicer.vtkOrientedImageData()
            self.segmentation_node.GetBinaryLabelmapRepresentation(segment_id, current)
            if is_empty(current):
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
