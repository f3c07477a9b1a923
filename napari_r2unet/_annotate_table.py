"""The Annotate widget's table: one row per image of the folder, with where it stands.

Columns: image, status (new / predicted / corrected / done, or "skipped" with the reason in the
tooltip), uncertainty (the prediction's mean predictive entropy, 0..1), corrected pixels and
the model behind the prediction. Double-clicking a row opens that image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from src_models.annotation import Entry, FolderSession

COLUMNS = ("image", "status", "uncertainty", "corrected px", "model")


def row_values(entry: Entry) -> tuple[str, ...]:
    status = "skipped" if entry.error else entry.status
    uncertainty = "" if entry.uncertainty is None else f"{entry.uncertainty:.3f}"
    corrected = f"{entry.corrected_pixels:,}" if entry.saved else ""
    model = Path(entry.model).stem if entry.model else ""
    return entry.id, status, uncertainty, corrected, model


class SessionTable(QTableWidget):
    """The folder's images; ``open_image(id)`` is called on a double-click."""

    def __init__(self, open_image: Callable[[str], None]) -> None:
        super().__init__(0, len(COLUMNS))
        self.setHorizontalHeaderLabels(list(COLUMNS))
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setStretchLastSection(True)
        self._rows: dict[str, int] = {}
        self.cellDoubleClicked.connect(lambda row, _: open_image(self.item(row, 0).text()))

    def show_session(self, session: FolderSession, current: str = "") -> None:
        self.setRowCount(len(session.entries))
        self._rows = {}
        for row, entry in enumerate(session.entries.values()):
            self._rows[entry.id] = row
            self._fill(row, entry)
        if current in self._rows:
            self.selectRow(self._rows[current])

    def update_entry(self, session: FolderSession, image_id: str) -> None:
        if image_id in self._rows:
            self._fill(self._rows[image_id], session.entries[image_id])

    def _fill(self, row: int, entry: Entry) -> None:
        for column, value in enumerate(row_values(entry)):
            item = QTableWidgetItem(value)
            if column in (2, 3):
                item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
            if entry.error:
                item.setToolTip(entry.error)
            self.setItem(row, column, item)

    def status_of(self, image_id: str) -> str:
        return self.item(self._rows[image_id], 1).text()
