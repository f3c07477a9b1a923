"""The base of both dock widgets: run / cancel buttons, progress, status, one worker at a time.

:class:`DockWidget` owns what the Segment and Fine-tune widgets share:

- the controls: a run and a Cancel button, a progress bar and a status line
  (:meth:`DockWidget._run_controls`);
- error display: :meth:`~DockWidget._guard` turns any failure into a one-line napari
  notification (our :class:`R2UNetError` messages as they are, anything else named as a bug),
  never a traceback; :meth:`~DockWidget._unless_busy` refuses a second job while one runs;
- the worker bridge (:class:`WorkerBridge`): signals the worker thread emits (training events,
  progress, messages), delivered on the GUI thread;
- the worker lifecycle (:meth:`~DockWidget._launch`): one napari worker at a time, stopped
  through a :class:`threading.Event` (Cancel, a closed viewer, the application quitting), with
  ``_finished`` set by the worker thread itself so that closing can wait for it.

Closing napari's window stops a running worker and waits for it: the widget climbs its Qt
parents to the main window (public Qt API only) and watches its close event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from src_models.errors import CancelledError, R2UNetError  # torch-free

PROGRESS_STEPS = 1000  # resolution of the progress bars


def user_message(exc: BaseException) -> str:
    """One line for a notification: our errors as they are, anything else named as a bug."""
    if isinstance(exc, R2UNetError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); please report it"


class WorkerBridge(QObject):
    """Signals emitted from the worker thread, delivered on the GUI thread."""

    event = Signal(object)  # training events
    progress = Signal(float)  # fraction done, 0..1
    message = Signal(str)  # a line for the user (e.g. "out of memory: retrying with smaller tiles")
    line = Signal(str)  # a step of a job, for the status line only (no notification)


class DockWidget(QWidget):
    """A dock widget that runs one job at a time in a napari worker thread."""

    busy_message = "a job is already running: wait for it or press Cancel"
    cancel_message = "cancelling ..."
    cancelled_message = "cancelled: nothing was added"
    status: QLabel
    run_button: QPushButton
    cancel_button: QPushButton
    progress: QProgressBar

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker: Any = None
        self._on_result: Callable[[Any], None] | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()  # set by the worker thread when it ends
        self._finished.set()
        self._watching_window = False
        self._bridge = WorkerBridge()
        self._bridge.progress.connect(self._on_progress)
        self._bridge.message.connect(self._notify_info)
        self.destroyed.connect(self._stop.set)  # a closed viewer stops a running worker
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop.set)

    # -- controls ----------------------------------------------------------------------------
    def _run_controls(self, run_text: str, hint: str) -> QVBoxLayout:
        """The run and Cancel buttons, the progress bar and the status line (showing ``hint``)."""
        buttons = QHBoxLayout()
        self.run_button = QPushButton(run_text)
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setTextVisible(False)
        self.status = QLabel(hint)
        self.status.setWordWrap(True)
        layout = QVBoxLayout()
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        return layout

    def start(self) -> None:
        """What the run button does (each widget defines it)."""
        raise NotImplementedError

    # -- notifications -------------------------------------------------------------------------
    def _notify_info(self, message: str) -> None:
        from napari.utils.notifications import show_info

        self.status.setText(message)
        show_info(message)

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    def _guard(self, action: Callable[[], Any]) -> Any:
        """``action()``, with any failure shown as a notification (returns None then)."""
        try:
            return action()
        except Exception as exc:  # every failure is a notification, never a traceback
            self._notify_error(user_message(exc))
            return None

    def _unless_busy(self, busy: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` guarded, or refuse with ``busy`` while this widget's worker runs (never queue on top)."""
        if self.running:
            self._notify_info(busy)
            return None
        return self._guard(action)

    # -- the worker ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _launch(self, function: Callable[..., Any], *args: Any, on_result: Callable[[Any], None], status: str) -> Any:
        """Run ``function(*args)`` in a worker thread; ``on_result`` gets its return value on the GUI thread."""
        from napari.qt.threading import create_worker

        self._stop.clear()
        self._finished.clear()
        finished = self._finished

        def run() -> Any:
            try:
                return function(*args)
            finally:
                finished.set()  # in the worker thread: shutdown() may be waiting on the GUI thread

        worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        self._on_result = on_result
        worker.returned.connect(self._on_returned)  # bound methods: nothing is called once the widget is gone
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._watch_window()
        self._set_running(True)
        self.status.setText(status)
        worker.start()
        return worker

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not running:
            self.progress.setRange(0, PROGRESS_STEPS)

    def cancel(self) -> None:
        """Ask the worker to stop (it checks between steps and inside tiles); see ``cancel_message``."""
        if self.running:
            self._stop.set()
            self.status.setText(self.cancel_message)

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until the worker thread is done (used when the viewer closes)."""
        return self._finished.wait(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop a running worker and wait for it (a fine-tune writes its best checkpoint first)."""
        self._stop.set()
        self.wait(timeout)

    def _on_progress(self, fraction: float) -> None:
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setValue(int(round(fraction * PROGRESS_STEPS)))

    def _on_returned(self, result: Any) -> None:
        handler, self._on_result = self._on_result, None
        if handler is not None:
            self._guard(lambda: handler(result))

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            self.status.setText(self.cancelled_message)
        else:
            self._notify_error(user_message(exc))

    def _on_finished(self) -> None:
        self._worker = None
        self._on_result = None
        self._set_running(False)

    # -- closing the viewer ------------------------------------------------------------------
    def _main_window(self) -> QMainWindow | None:
        """napari's main window, found through the Qt parents (a floating dock keeps its parent)."""
        widget = self.parentWidget()
        while widget is not None and not isinstance(widget, QMainWindow):
            widget = widget.parentWidget()
        return widget

    def _watch_window(self) -> None:
        if self._watching_window:
            return
        window = self._main_window()
        if window is not None:
            window.installEventFilter(self)  # no Python reference kept: the viewer must be free to go
            self._watching_window = True

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Close and self.running:
            # napari may still ask "close?": act once the close went through, not before
            QTimer.singleShot(0, self._after_window_close)
        return False

    def _after_window_close(self) -> None:
        window = self._main_window()
        if self.running and (window is None or not window.isVisible()):
            self.shutdown()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)
