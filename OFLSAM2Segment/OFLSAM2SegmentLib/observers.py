"""Observers of the module widget that must exist only while the module is shown.

Each segment change makes the widget list the annotated slices again, which reads every
selected segment over the whole volume. The widget activates these observers in ``enter()``
and deactivates them in ``exit()``, so that strokes painted in the Segment Editor while the
module is hidden cost nothing. No Qt here: tested with real MRML nodes (slicer-core).
"""

from __future__ import annotations

from typing import Callable

import slicer

# Segmentation-node events after which the annotated slices may differ (voxel edits arrive as
# SourceRepresentationModified; renames and status changes as SegmentModified).
SEGMENT_EVENTS = ("SegmentModified", "SegmentAdded", "SegmentRemoved", "SourceRepresentationModified")


class SegmentationObserver:
    """Calls ``callback(caller, event)`` on segment changes of one segmentation node, only while active."""

    def __init__(self, callback: Callable):
        self.callback = callback
        self.node = None
        self.active = False
        self._tags: list[int] = []

    @property
    def observing(self) -> bool:
        return bool(self._tags)

    def setNode(self, node) -> None:
        """Follow another segmentation node (None: none)."""
        self._remove()
        self.node = node
        if self.active:
            self._add()

    def activate(self) -> None:
        self.active = True
        if not self._tags:
            self._add()

    def deactivate(self) -> None:
        self.active = False
        self._remove()

    def _add(self) -> None:
        if self.node is not None:
            self._tags = [self.node.AddObserver(getattr(slicer.vtkSegmentation, event), self.callback) for event in SEGMENT_EVENTS]

    def _remove(self) -> None:
        if self.node is not None:
            for tag in self._tags:
                self.node.RemoveObserver(tag)
        self._tags = []
