"""What both dock widgets share: one-line notifications and the model menu.

- :class:`Notifying`: ``_guard(action)`` turns any failure into a napari notification (our
  :class:`R2UNetError` messages as they are, anything else named as a bug), never a traceback.
- :class:`ModelMenu`: a combo box of the shipped models, the user's fine-tuned versions and the
  checkpoint files opened in this widget, plus "Load checkpoint..."; it re-reads the model
  folders each time it opens, so a version made a moment ago is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QLabel

from src_models.errors import R2UNetError  # torch-free

from ._models import ModelChoice, all_choices, file_choice

LOAD_CHECKPOINT = "Load checkpoint..."


def user_message(exc: BaseException) -> str:
    """One line for a notification: our errors as they are, anything else named as a bug."""
    if isinstance(exc, R2UNetError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); please report it"


class Notifying:
    """Mixin for widgets with a ``status`` label."""

    status: QLabel

    def _notify_info(self, message: str) -> None:
        from napari.utils.notifications import show_info

        self.status.setText(message)
        show_info(message)

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    def _unless_busy(self, busy: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` guarded, or refuse with ``busy`` while this widget's worker runs (never queue on top)."""
        if getattr(self, "running", False):
            self._notify_info(busy)
            return None
        return self._guard(action)

    def _guard(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as exc:  # every failure is a notification, never a traceback
            self._notify_error(user_message(exc))
            return None


class ModelMenu(QComboBox):
    """Shipped models, fine-tuned versions, opened files and "Load checkpoint..."."""

    def __init__(self, guard: Callable[[Callable[[], Any]], Any]) -> None:
        super().__init__()
        self._guard = guard
        self.opened: list[ModelChoice] = []  # checkpoint files opened in this widget
        self.refresh()
        self.activated.connect(self._on_activated)

    def refresh(self, select: str | None = None) -> None:
        """Re-list every model; keep the current choice (or ``select`` a spec)."""
        keep = select if select is not None else self.currentData()
        self.blockSignals(True)
        self.clear()
        for choice in all_choices(self.opened):
            self.addItem(choice.label, choice.spec)
            self.setItemData(self.count() - 1, choice.tooltip, Qt.ToolTipRole)
        self.addItem(LOAD_CHECKPOINT, None)
        index = self.findData(keep) if keep else -1
        self.setCurrentIndex(index if index >= 0 else 0)
        self.blockSignals(False)

    def add_file(self, path: str) -> ModelChoice:
        """Offer a checkpoint file (validated from its header; weights load later) and choose it."""
        choice = file_choice(path)
        self.opened = [c for c in self.opened if c.spec != choice.spec] + [choice]
        self.refresh(select=choice.spec)
        return choice

    def showPopup(self) -> None:  # noqa: N802 (Qt API)
        self.refresh()
        super().showPopup()

    def _on_activated(self, index: int) -> None:
        if self.itemData(index) is not None:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open a checkpoint", "", "Checkpoints (*.safetensors *.pt *.pth)")
        if path:
            self._guard(lambda: self.add_file(path))
        else:
            self.setCurrentIndex(0)
