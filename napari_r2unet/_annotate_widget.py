"""The Annotate folder widget: a clinician's queue over a folder of images, kept on disk.

Choose a folder (and optionally a folder of existing masks); the table lists its images with
their status, uncertainty and corrected pixels (:class:`~src_models.annotation.FolderSession`
keeps them in the labels folder). **Next** opens the next image to correct, most uncertain first
or in order, with its prediction as an editable Labels layer; predictions for the rest of the
folder run ahead in a background worker, so Next is instant. Edits are saved (atomically) when
the image changes, every few seconds while editing and when napari closes; reopening the folder
brings every correction, status and the position back. **Done** accepts the labels as they are.
**Retrain now** fine-tunes the folder's model on every saved correction (a new version; the
base is only read) and, when the version beats its base on held-out blocks, predicts the images
not yet corrected again with it; corrections are never replaced.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from src_models.annotation import FolderSession
from src_models.errors import R2UNetError  # torch-free
from src_models.training.events import EventKind  # torch-free

from ._annotate import SESSION_KEY, predict_folder, replace_prediction, session_layers
from ._annotate_table import SessionTable
from ._dock import PROGRESS_STEPS, DockWidget, user_message
from ._model_menu import ModelMenu
from ._models import file_model_name, is_model_file, model_classes

AUTOSAVE_SECONDS = 10  # at most this many seconds of edits can be lost in a crash
ORDER_LABELS = {"uncertainty": "most uncertain first", "sequential": "in file order"}


class _Lines(QObject):
    """Lines from the prediction worker (a model's notices, a skipped image), for the status line only:
    predictions run in the background and must not fill the canvas with notifications."""

    line = Signal(str)


class AnnotateWidget(DockWidget):
    """Dock widget: open a folder, Next, correct, (autosaved), Done, Retrain now."""

    busy_message = "retraining is running: wait for it or press Cancel"
    cancel_message = "cancelling: finishing the current training step ..."

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        self.session: FolderSession | None = None
        self.current: str = ""
        self._labels_layer: Any = None
        self._snapshot: np.ndarray | None = None
        self._predictor: Any = None
        self._predict_stop = threading.Event()
        self._last_error = ""
        self._bridge.event.connect(self._on_event)
        self._lines = _Lines()
        self._build()
        self._lines.line.connect(self.status.setText)
        self.autosave_timer = QTimer(self)
        self.autosave_timer.timeout.connect(self.autosave)
        self.set_autosave_seconds(AUTOSAVE_SECONDS)

    # -- UI ----------------------------------------------------------------------------------
    def _folder_row(self, placeholder: str) -> tuple[QHBoxLayout, QLineEdit]:
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        button = QPushButton("...")
        button.setMaximumWidth(32)
        button.clicked.connect(lambda: self._choose_folder(edit))
        row = QHBoxLayout()
        row.addWidget(edit)
        row.addWidget(button)
        return row, edit

    def _build(self) -> None:
        form = QFormLayout()
        row, self.images_edit = self._folder_row("the folder of images to annotate")
        form.addRow("images", row)
        row, self.labels_edit = self._folder_row("default: <images>/labels")
        form.addRow("corrections", row)
        row, self.masks_edit = self._folder_row("optional: existing masks to start from")
        form.addRow("existing masks", row)
        self.model_combo = ModelMenu(self._guard)
        self.model_combo.chosen.connect(lambda choice: self._guard(lambda: self._model_changed(choice.spec)))
        form.addRow("model", self.model_combo)
        self.order_combo = QComboBox()
        for key, label in ORDER_LABELS.items():
            self.order_combo.addItem(label, key)
        form.addRow("next", self.order_combo)
        self.autosave_spin = QSpinBox()
        self.autosave_spin.setRange(1, 600)
        self.autosave_spin.setSuffix(" s")
        self.autosave_spin.valueChanged.connect(self.set_autosave_seconds)
        form.addRow("autosave every", self.autosave_spin)
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 600)
        self.minutes_spin.setValue(5.0)
        self.minutes_spin.setSuffix(" min")
        form.addRow("retrain for", self.minutes_spin)
        self.validate_check = QCheckBox("adopt the new version only if it beats the folder's model on held-out corrections")
        self.validate_check.setChecked(True)
        self.validate_check.setToolTip("from 3 corrected images on, one in five is held out whole and the version must score better there; "
                                       "with fewer, 20% of each image (blocks across its foreground) for a tiled model, nothing for a whole-image one")
        form.addRow("", self.validate_check)
        buttons = QHBoxLayout()
        self.open_button, self.next_button, self.done_button = QPushButton("Open folder"), QPushButton("Next"), QPushButton("Done, next")
        self.open_button.clicked.connect(lambda: self._guard(self.open_folder))
        self.next_button.clicked.connect(lambda: self._guard(self.next_image))
        self.done_button.clicked.connect(lambda: self._guard(self.mark_done))
        self.next_button.setToolTip("save this image's edits and open the next image to correct")
        self.done_button.setToolTip("save these labels as this image's correction (even unchanged), then open the next")
        for button in (self.open_button, self.next_button, self.done_button):
            buttons.addWidget(button)
        self.table = SessionTable(lambda image_id: self._guard(lambda: self.open_image(image_id)))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.table)
        layout.addLayout(self._run_controls("Retrain now", "Choose a folder of images and press Open folder."))
        self.run_button.setToolTip("fine-tune the folder's model on every saved correction, then predict the rest again")
        layout.addStretch(1)

    def _choose_folder(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or str(Path.home()))
        if folder:
            edit.setText(folder)

    def set_autosave_seconds(self, seconds: int) -> None:
        if self.autosave_spin.value() != seconds:
            self.autosave_spin.setValue(int(seconds))
        self.autosave_timer.start(int(seconds) * 1000)

    # -- the folder ----------------------------------------------------------------------------
    def open_folder(self, images: str | None = None, labels: str | None = None, masks: str | None = None) -> FolderSession:
        """Open (or resume) a folder session; the last image worked on comes back."""
        images = images or self.images_edit.text().strip()
        if not images:
            raise R2UNetError("choose the folder of images first")
        if self.running:
            raise R2UNetError("retraining is running: wait for it (or press Cancel), then open another folder")
        self.close_session()
        session = FolderSession(images, labels or self.labels_edit.text().strip() or None, masks or self.masks_edit.text().strip() or None)
        self.session = session
        self.images_edit.setText(str(session.images_dir))
        self.labels_edit.setText(str(session.labels_dir))
        if session.model:
            self._guard(lambda: self._select_model(session.model))
        else:
            choice = self.model_combo.current_choice()
            if choice is not None:
                session.set_model(choice.spec)
        self.order_combo.setCurrentIndex(max(0, self.order_combo.findData(session.state.get("order", "uncertainty"))))
        self._watch_window()
        self.table.show_session(session)
        counts = session.counts()
        self.status.setText(f"{len(session.entries)} images in {session.images_dir.name}: {counts['done']} done, "
                            f"{counts['corrected']} corrected; corrections go to {session.labels_dir}")
        if session.current:
            self.open_image(session.current)
        self.start_predictions()
        return session

    def _select_model(self, spec: str) -> None:
        """Show the folder's model in the menu (a checkpoint file not listed yet is added)."""
        try:
            self.model_combo.choose(spec)
        except R2UNetError:
            if not is_model_file(spec):
                raise
            self.model_combo.add_file(spec)

    def _require_session(self) -> FolderSession:
        if self.session is None:
            raise R2UNetError("no folder is open: choose a folder of images and press Open folder")
        return self.session

    def _model_changed(self, spec: str) -> None:
        if self.session is not None and spec != self.session.model:
            self.session.set_model(spec)
            self.start_predictions()

    # -- images --------------------------------------------------------------------------------
    def open_image(self, image_id: str) -> None:
        """Save the open image's edits, then show ``image_id`` with its labels."""
        session = self._require_session()
        if image_id not in session.entries:
            raise R2UNetError(f"{image_id!r} is not an image of {session.images_dir}")
        self.save_current()  # raises (and keeps the image open) if it cannot be saved
        image = session.read_image(image_id)
        self._remove_session_layers()
        _, self._labels_layer = session_layers(self.viewer, session, image_id, image)
        self._snapshot = np.array(self._labels_layer.data)
        self.current = image_id
        session.set_current(image_id)
        self.table.show_session(session, current=image_id)
        entry = session.entries[image_id]
        state = "its saved correction" if entry.saved else "the prediction" if entry.status == "predicted" else "no prediction yet (coming)"
        self.status.setText(f"{image_id}: {state}; correct it with the brush, then Next (edits are saved as you go)")

    def _remove_session_layers(self) -> None:
        for layer in [layer for layer in self.viewer.layers if SESSION_KEY in getattr(layer, "metadata", {})]:
            self.viewer.layers.remove(layer)
        self._labels_layer, self._snapshot = None, None

    def next_image(self, done: bool = False) -> str | None:
        """Save (as done when ``done``) and open the next image to correct; None when none is left."""
        session = self._require_session()
        self.save_current(done=done)
        order = self.order_combo.currentData()
        session.state["order"] = order
        next_id = session.next_id(order, after=self.current)
        if next_id is None:
            self.status.setText("every image of the folder is corrected: press Retrain now, or open another folder")
            return None
        self.open_image(next_id)
        return next_id

    def mark_done(self) -> str | None:
        return self.next_image(done=True)

    def save_current(self, done: bool = False) -> bool:
        """Write the open image's labels if they changed (or ``done``); errors keep the edits open and raise."""
        layer, session = self._labels_layer, self.session
        if session is None or layer is None or not self.current or layer not in self.viewer.layers:
            return False
        data = np.asarray(layer.data)
        if not done and self._snapshot is not None and np.array_equal(data, self._snapshot):
            return False
        written = session.save_correction(self.current, data, done=done, binary=model_classes(session.model) == 1)
        self._snapshot = data.copy()
        if written:
            self.table.update_entry(session, self.current)
        return written

    def autosave(self) -> None:
        """The timer's save: failures are shown once (the edits stay in the layer), never raised."""
        try:
            if self.save_current():
                self._last_error = ""
        except Exception as exc:  # a full or read-only disk: say so once, keep the edits, retry on the next tick
            message = user_message(exc) + "; your edits are still open, nothing was lost"
            if message != self._last_error:
                self._notify_error(message)
            self._last_error = message

    # -- predictions ahead -----------------------------------------------------------------------
    @property
    def predicting(self) -> bool:
        return self._predictor is not None

    def start_predictions(self) -> None:
        """(Re)start the background worker on whatever the folder needs predicted."""
        from napari.qt.threading import create_worker

        session = self.session
        self.stop_predictions()
        if session is None or not session.model or not session.to_predict():
            return
        stop = self._predict_stop = threading.Event()
        worker = create_worker(predict_folder, session, session.model, lambda: self.current, stop, self._lines.line.emit,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_predicted)
        worker.errored.connect(lambda exc: self._notify_error(user_message(exc)))
        worker.finished.connect(lambda: self._predictions_ended(worker))
        self._predictor = worker
        worker.start()

    def stop_predictions(self, wait: float = 30.0) -> None:
        worker = self._predictor
        if worker is None:
            return
        self._predict_stop.set()
        deadline = time.monotonic() + wait
        from qtpy.QtWidgets import QApplication

        while self._predictor is worker and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)

    def _predictions_ended(self, worker: Any) -> None:
        if self._predictor is worker:
            self._predictor = None
        if self.session is not None:
            self.table.show_session(self.session, current=self.current)  # skipped images too

    def _on_predicted(self, image_id: str) -> None:
        session = self.session
        if session is None or image_id not in session.entries:
            return
        self.table.update_entry(session, image_id)
        layer = self._labels_layer
        if image_id == self.current and layer is not None and layer in self.viewer.layers and not session.entries[image_id].saved:
            # strokes painted before the prediction arrived are merged into it and still unsaved: the layer stays
            # "edited" then (taking the merged data as the saved state lost them: Next and autosave wrote nothing)
            edited = self._snapshot is None or not np.array_equal(np.asarray(layer.data), self._snapshot)
            replace_prediction(layer, session, image_id)
            if not edited:
                self._snapshot = np.array(layer.data)

    # -- retrain ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Retrain now (refused while a run goes)."""
        self._unless_busy(self.busy_message, self._retrain)

    def _retrain(self) -> None:
        from src_models.annotation_run import retrain_request
        from src_models.user_versions import reserved_version_path

        from ._finetune import finetune

        session = self._require_session()
        self.save_current()
        base = file_model_name(session.model) if is_model_file(session.model) else session.model
        name = f"{base.split('-ft-')[0]} + {len(session.saved_ids())} corrected ({session.images_dir.name})"
        validation = "auto" if self.validate_check.isChecked() else "none"
        with reserved_version_path(base) as out:
            request = retrain_request(session, out, name, minutes=self.minutes_spin.value(), validation=validation)
        self.stop_predictions()
        self._launch(finetune, request, self._bridge.event.emit, self._stop.is_set, on_result=self._retrained,
                     status=f"retraining on {len(request.pairs)} corrected image(s) for at most {self.minutes_spin.value():g} min ...")

    def _on_event(self, event: Any) -> None:
        if event.kind == EventKind.STEP:
            self.progress.setValue(int(event.fraction * PROGRESS_STEPS))
        elif event.kind == EventKind.BASELINE and event.metrics:
            self.status.setText(f"the folder's model: validation Dice {event.metrics.get('F1', float('nan')):.3f}; training ...")

    def _retrained(self, path: str) -> None:
        from src_models.annotation_run import adopt_version

        session = self._require_session()
        if not path:
            self.status.setText("cancelled before the first training step: no version was written")
            self.start_predictions()
            return
        adopted, why = adopt_version(session, path)
        self.model_combo.refresh(select=session.model)
        left = len(session.to_predict())
        self._notify_info(why + (f"; predicting the {left} image(s) not yet corrected again" if adopted and left else ""))
        self.start_predictions()

    # -- closing --------------------------------------------------------------------------------------
    def close_session(self) -> None:
        """Save the open image, stop predicting and give the folder back (its lock file goes)."""
        if self.session is None:
            return
        try:
            self.save_current()
        finally:
            self.stop_predictions()
            self.session.close()
            self.session = None
            self._remove_session_layers()
            self.current = ""

    def shutdown(self, timeout: float = 30.0) -> None:
        super().shutdown(timeout)
        self._guard(self.close_session)

    def _after_window_close(self) -> None:
        window = self._main_window()
        if window is None or not window.isVisible():
            self.shutdown()

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt API)
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Close:
            self._guard(self.save_current)  # before napari tears the layers down
            QTimer.singleShot(0, self._after_window_close)
        return False
