"""The review of the last run in the GUI, shared by the module panel and the Segment Editor effect.

:class:`QualityReview` binds a two-column table (slice, quality) and a "Next slice to check"
button to a run logic: the table lists the per-slice quality of the last completed run for one
segment; clicking a row, or the button, centres every slice view on that slice. The logic does
the work (:meth:`~.logic.OFLSAM2Logic.lastRunQuality`, :meth:`~.logic.OFLSAM2Logic.nextSliceToCheck`);
this module only shows it. Qt is imported on use: the rows and the jumps run outside Slicer too.
"""

from __future__ import annotations

from typing import Callable

import slicer

QUALITY_HEADERS = ("Slice", "Quality")


def quality_rows(logic, segment_id: str | None) -> list[tuple[str, str]]:
    """(slice, quality) texts of the last completed run for ``segment_id``, in slice order; none
    when there is no such run or it did not segment ``segment_id``."""
    if logic is None or segment_id is None or segment_id not in logic.reviewedSegmentIds():
        return []
    return [(str(index), f"{quality:.2f}") for index, quality in logic.lastRunQuality(segment_id)]


def jump_slice_views(ras, volume_node=None) -> None:
    """Centre every slice view on the RAS point ``ras`` (showing ``volume_node`` in them if given)."""
    if volume_node is not None:
        slicer.util.setSliceViewerLayers(background=volume_node)
    for slice_node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
        slice_node.JumpSliceByCentering(*ras)


def new_quality_table():
    """A compact, read-only quality table for a panel that has none in its .ui file."""
    import qt

    table = qt.QTableWidget()
    table.setColumnCount(len(QUALITY_HEADERS))
    table.setHorizontalHeaderLabels(list(QUALITY_HEADERS))
    table.horizontalHeader().setStretchLastSection(True)
    table.verticalHeader().hide()
    table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
    table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
    table.setMaximumHeight(160)
    table.toolTip = "Per-slice quality of the selected segment after the last run (1: annotated). Click a row to show that slice."
    return table


class QualityReview:
    """The quality table and "Next slice to check" button of a panel.

    ``logic``: returns the run logic whose last completed run is reviewed (or None);
    ``segment``: returns the segment ID to review (or None); ``show_status``: shows a line of text;
    ``volume``: returns the volume to show in the slice views when jumping (None: leave them).
    Call :meth:`refresh_table` after a run ends or the segment selection changes,
    :meth:`update_button` when a run starts or ends, :meth:`disconnect` when the panel goes away.
    """

    def __init__(self, table, next_button, logic: Callable, segment: Callable, show_status: Callable[[str], None],
                 volume: Callable | None = None):
        self.table = table
        self.next_button = next_button
        self._logic = logic
        self._segment = segment
        self._show_status = show_status
        self._volume = volume or (lambda: None)
        self.table.connect("cellClicked(int,int)", self.onRowClicked)
        self.next_button.connect("clicked()", self.onNextSlice)

    def disconnect(self) -> None:
        self.table.disconnect("cellClicked(int,int)", self.onRowClicked)
        self.next_button.disconnect("clicked()", self.onNextSlice)

    def reviewed_segment(self) -> str | None:
        """The segment to review if the last completed run segmented it, else None."""
        logic, segment_id = self._logic(), self._segment()
        return segment_id if logic is not None and segment_id in logic.reviewedSegmentIds() else None

    def refresh_table(self) -> int:
        """Refill the table for the current segment; returns its row count."""
        import qt

        rows = quality_rows(self._logic(), self._segment())
        self.table.setRowCount(0)
        self.table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, text in enumerate(cells):
                self.table.setItem(row, column, qt.QTableWidgetItem(text))
        return len(rows)

    def update_button(self, running: bool) -> None:
        """Offer "Next slice to check" for a reviewed segment while no run is in progress."""
        self.next_button.enabled = not running and self.reviewed_segment() is not None

    def onRowClicked(self, row, column) -> None:
        item = self.table.item(row, 0)
        if item is None or self.reviewed_segment() is None:
            return
        jump_slice_views(self._logic().reviewedPlaneCenterRas(int(item.text())), self._volume())

    def onNextSlice(self) -> None:
        from slicer.i18n import tr as _

        with slicer.util.tryWithErrorDisplay(_("No slice to suggest."), waitCursor=True):
            suggestion = self._logic().nextSliceToCheck(self.reviewed_segment())
            if suggestion is None:
                self._show_status(_("No slice to suggest: every slice of the object is annotated or near one."))
                return
            index, ras = suggestion
            self._show_status(_("Check slice {index}.").format(index=index))
            jump_slice_views(ras, self._volume())
