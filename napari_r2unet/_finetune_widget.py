"""The Fine-tune widget: correct the labels, retrain in the background, re-segment the rest.

The loop a clinician runs: segment an image (Segment widget), fix the mistakes with napari's
brushes, press Fine-tune here. Training runs in a worker thread with a live loss / validation
Dice curve, an ETA and a Cancel that stops after the current step and keeps the best checkpoint.
Every run writes a NEW version into the per-user model folder (the base model and older
versions are only read); versions can be renamed, exported and chosen again at any time, and
one click re-segments the other open images with the chosen version (new layers only: edited
layers are never touched). "Next doubtful region" moves the view to where the model hesitates
most, so corrections go where they teach the model the most.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from src_models.errors import CancelledError, R2UNetError  # torch-free
from src_models.versions import export_destination, export_version, list_versions, new_version_path, rename_version

from ._finetune import (
    FinetuneRequest,
    PairChoice,
    candidate_pairs,
    corrections,
    doubtful_regions,
    finetune,
    is_output_layer,
    matching_images,
    pair_data,
)
from ._layers import META_KEY, add_result_layers, plan_job
from ._models import ModelChoice
from ._plot import CurvePlot
from ._widget_common import ModelMenu, Notifying, user_message
from ._worker import SegmenterCache, segment

VALIDATION_NONE = "none (train on everything)"
VALIDATION_HOLDOUT = "hold out 20% of each image"


class _Bridge(QObject):
    event = Signal(object)
    progress = Signal(float)
    message = Signal(str)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f", about {seconds / 60:.1f} min left" if seconds >= 90 else f", about {seconds:.0f} s left"


class FinetuneWidget(Notifying, QWidget):
    """Dock widget: corrected labels -> a new fine-tuned model version -> re-segmented images."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker: Any = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._finished.set()
        self._bridge = _Bridge()
        self._bridge.event.connect(self._on_event)
        self._bridge.progress.connect(self._on_segment_progress)
        self._bridge.message.connect(self._notify_info)
        self._cache = SegmenterCache()
        self._last_version: str | None = None
        self._doubtful: list[tuple[int, int, float]] = []
        self._doubtful_layer: str | None = None
        self._started = 0.0
        self._watching_window = False
        self._resegmenting: tuple[str, str] = ("", "")
        self._image_for: dict[str, str] = {}  # labels layer -> the image the user paired it with
        self._refresh_timer = QTimer(self)  # brush strokes update the corrected-pixel counts, at most ~3 times a second
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(300)
        self._refresh_timer.timeout.connect(self.refresh_pairs)
        self._build()
        self.refresh_pairs()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh_pairs)
        self.destroyed.connect(self._stop.set)  # a closed viewer stops the training

    # -- UI ----------------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)

        pairs_box = QGroupBox("Training pairs (labels <- image)")
        pairs_layout = QVBoxLayout(pairs_box)
        self.pair_list = QListWidget()
        self.pair_list.setToolTip("tick the corrected Labels layers to learn from")
        self.pair_list.setMaximumHeight(110)
        self.pair_list.itemChanged.connect(self._update_summary)
        self.pair_list.currentRowChanged.connect(self._show_pair_images)
        pairs_layout.addWidget(self.pair_list)
        image_row = QFormLayout()
        self.pair_image_combo = QComboBox()
        self.pair_image_combo.setToolTip("the image the selected labels annotate (when several images have its shape)")
        self.pair_image_combo.activated.connect(self._choose_pair_image)
        image_row.addRow("its image", self.pair_image_combo)
        pairs_layout.addLayout(image_row)
        row = QHBoxLayout()
        self.all_corrected_button = QPushButton("All layers with corrections")
        self.all_corrected_button.clicked.connect(self.select_corrected)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh_pairs)
        row.addWidget(self.all_corrected_button)
        row.addWidget(refresh)
        pairs_layout.addLayout(row)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        pairs_layout.addWidget(self.summary)
        layout.addWidget(pairs_box)

        form = QFormLayout()
        self.base_combo = ModelMenu(self._guard)
        form.addRow("base model", self.base_combo)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(10)
        self.epochs_spin.setToolTip("passes of 25 steps over the training pairs")
        form.addRow("epochs", self.epochs_spin)
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.0, 24 * 60)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setValue(5.0)
        self.minutes_spin.setSpecialValueText("no limit")
        self.minutes_spin.setToolTip("stop after this many minutes even if epochs remain (0 = no limit)")
        form.addRow("at most (min)", self.minutes_spin)
        self.validation_combo = QComboBox()
        self.validation_combo.setToolTip("images (or parts) kept out of training to measure Dice and pick the best epoch")
        form.addRow("validation", self.validation_combo)
        layout.addLayout(form)

        self.advanced_button = QToolButton()
        self.advanced_button.setText("advanced")
        self.advanced_button.setCheckable(True)
        self.advanced_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.advanced_button.setArrowType(Qt.RightArrow)
        self.advanced_button.toggled.connect(self._toggle_advanced)
        layout.addWidget(self.advanced_button)
        self.advanced = QWidget()
        adv = QFormLayout(self.advanced)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(3e-4)
        adv.addRow("learning rate", self.lr_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 512)
        self.patch_spin.setSingleStep(16)
        self.patch_spin.setValue(96)
        adv.addRow("patch size", self.patch_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(4)
        adv.addRow("batch size", self.batch_spin)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 10000)
        self.steps_spin.setValue(25)
        adv.addRow("steps per epoch", self.steps_spin)
        self.weight_spin = QDoubleSpinBox()
        self.weight_spin.setRange(1.0, 100.0)
        self.weight_spin.setValue(5.0)
        self.weight_spin.setToolTip("how much more a corrected pixel counts in the loss")
        adv.addRow("correction weight", self.weight_spin)
        self.freeze_combo = QComboBox()
        self.freeze_combo.addItems(["bn", "none", "encoder"])
        self.freeze_combo.setToolTip("bn: keep the base model's BatchNorm statistics (best for a few images); encoder: also freeze the encoder")
        adv.addRow("freeze", self.freeze_combo)
        self.advanced.setVisible(False)
        layout.addWidget(self.advanced)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Fine-tune")
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        layout.addWidget(self.progress)
        self.status = QLabel("Segment an image, correct the labels with the brush, then press Fine-tune.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.plot = CurvePlot()
        layout.addWidget(self.plot)

        versions_box = QGroupBox("Versions")
        versions = QVBoxLayout(versions_box)
        self.version_combo = QComboBox()
        versions.addWidget(self.version_combo)
        row = QHBoxLayout()
        self.rename_button = QPushButton("Rename...")
        self.rename_button.clicked.connect(lambda: self._guard(self.rename_dialog))
        self.export_button = QPushButton("Export...")
        self.export_button.clicked.connect(lambda: self._guard(self.export_dialog))
        row.addWidget(self.rename_button)
        row.addWidget(self.export_button)
        versions.addLayout(row)
        self.resegment_button = QPushButton("Re-segment other images with this version")
        self.resegment_button.setToolTip("adds new Labels layers for every open image not used for training; edited layers are not touched")
        self.resegment_button.clicked.connect(self.resegment)
        versions.addWidget(self.resegment_button)
        layout.addWidget(versions_box)

        self.doubt_button = QPushButton("Next doubtful region")
        self.doubt_button.setToolTip("move the view to the next place where the selected result's model is least sure")
        self.doubt_button.clicked.connect(lambda: self._guard(self.next_doubtful_region))
        layout.addWidget(self.doubt_button)
        layout.addStretch(1)
        self.refresh_versions()

    def _toggle_advanced(self, shown: bool) -> None:
        self.advanced.setVisible(shown)
        self.advanced_button.setArrowType(Qt.DownArrow if shown else Qt.RightArrow)

    # -- models and versions -------------------------------------------------------------------
    def refresh_models(self, select: str | None = None) -> None:
        self.base_combo.refresh(select)

    def add_model(self, path: str) -> ModelChoice:
        """Offer a checkpoint file as a base model."""
        return self.base_combo.add_file(path)

    def refresh_versions(self, select: str | None = None) -> None:
        keep = select or self.version_combo.currentData()
        self.version_combo.clear()
        for version in reversed(list_versions()):
            self.version_combo.addItem(version.name, str(version.path))
            self.version_combo.setItemData(self.version_combo.count() - 1, version.summary, Qt.ToolTipRole)
        index = self.version_combo.findData(keep) if keep else -1
        self.version_combo.setCurrentIndex(max(0, index))
        has = self.version_combo.count() > 0
        for button in (self.rename_button, self.export_button, self.resegment_button):
            button.setEnabled(has)

    def _chosen_version(self) -> str:
        path = self.version_combo.currentData()
        if not path:
            raise R2UNetError("no fine-tuned version yet: press Fine-tune first")
        return str(path)

    def rename_dialog(self) -> None:
        path = self._chosen_version()
        name, ok = QInputDialog.getText(self, "Rename version", "name", text=self.version_combo.currentText())
        if ok:
            self.rename(path, name)

    def rename(self, path: str, name: str) -> None:
        rename_version(path, name)
        self.refresh_versions(select=path)
        self._refresh_model_menus()

    def export_dialog(self) -> None:
        path = self._chosen_version()
        target, _ = QFileDialog.getSaveFileName(self, "Export version", Path(path).name, "Checkpoints (*.safetensors)")
        if target:
            self.export(path, target)

    def export(self, path: str, target: str) -> Path:
        # the save dialog already asked about replacing the file it names; any other file is refused
        written = export_version(path, target, overwrite=export_destination(path, target) == Path(target).expanduser())
        self.status.setText(f"exported to {written}")
        return written

    def _refresh_model_menus(self) -> None:
        """Show new or renamed versions in the model menus of this viewer's widgets."""
        for widget in list(self.viewer.window.dock_widgets.values()):
            refresh = getattr(widget, "refresh_models", None)
            if callable(refresh) and widget is not self:
                refresh()
        self.refresh_models()

    # -- pairs -------------------------------------------------------------------------------
    def _schedule_refresh(self, event: Any = None) -> None:
        self._refresh_timer.start()

    def refresh_pairs(self, event: Any = None) -> None:
        self._guard(self._refresh_pairs)

    def _refresh_pairs(self) -> None:
        from napari.layers import Labels

        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and hasattr(layer.events, "paint"):
                layer.events.paint.connect(self._schedule_refresh)  # once: napari ignores repeated connections
        checked = {self.pair_list.item(i).data(Qt.UserRole).labels for i in range(self.pair_list.count())
                   if self.pair_list.item(i).checkState() == Qt.Checked}
        current = self.pair_list.currentItem().data(Qt.UserRole).labels if self.pair_list.currentItem() else None
        self.pair_list.blockSignals(True)
        self.pair_list.clear()
        for pair in candidate_pairs(self.viewer, self._image_for):
            item = QListWidgetItem(pair.label)
            item.setData(Qt.UserRole, pair)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if pair.labels in checked else Qt.Unchecked)
            self.pair_list.addItem(item)
            if pair.labels == current:
                self.pair_list.setCurrentItem(item)
        self.pair_list.blockSignals(False)
        self._show_pair_images()
        self._update_validation_choices()
        self._update_summary()

    def _show_pair_images(self, row: int = -1) -> None:
        item = self.pair_list.currentItem()
        self.pair_image_combo.clear()
        if item is None or item.data(Qt.UserRole).labels not in self.viewer.layers:
            self.pair_image_combo.setEnabled(False)
            return
        pair = item.data(Qt.UserRole)
        self.pair_image_combo.addItems([im.name for im in matching_images(self.viewer, self.viewer.layers[pair.labels])])
        self.pair_image_combo.setCurrentText(pair.image)
        self.pair_image_combo.setEnabled(self.pair_image_combo.count() > 1)

    def _choose_pair_image(self, index: int) -> None:
        item = self.pair_list.currentItem()
        if item is not None:
            self.choose_image(item.data(Qt.UserRole).labels, self.pair_image_combo.itemText(index))

    def choose_image(self, labels: str, image: str) -> None:
        """Pair the Labels layer ``labels`` with the Image layer ``image`` (same shape)."""
        self._image_for[labels] = image
        self.refresh_pairs()

    def select_corrected(self) -> int:
        """Tick every pair whose labels differ from the model's prediction; returns how many."""
        self.refresh_pairs()
        count = 0
        for i in range(self.pair_list.count()):
            item = self.pair_list.item(i)
            pair = item.data(Qt.UserRole)
            corrected = bool(pair.corrected)
            item.setCheckState(Qt.Checked if corrected else Qt.Unchecked)
            count += corrected
        if not count:
            self.status.setText("no layer has corrections yet: paint or erase in a result layer (or tick a hand-drawn one)")
        return count

    def set_checked(self, labels_names: list[str]) -> None:
        for i in range(self.pair_list.count()):
            item = self.pair_list.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole).labels in labels_names else Qt.Unchecked)

    def checked_pairs(self) -> list[PairChoice]:
        return [self.pair_list.item(i).data(Qt.UserRole) for i in range(self.pair_list.count())
                if self.pair_list.item(i).checkState() == Qt.Checked]

    def _update_validation_choices(self) -> None:
        current = self.validation_combo.currentText()
        self.validation_combo.clear()
        self.validation_combo.addItem(VALIDATION_NONE, "none")
        self.validation_combo.addItem(VALIDATION_HOLDOUT, "holdout")
        for pair in self.checked_pairs():
            self.validation_combo.addItem(f"hold out {pair.labels}", f"pair:{pair.labels}")
        index = self.validation_combo.findText(current)
        self.validation_combo.setCurrentIndex(index if index >= 0 else 1)

    def _update_summary(self, item: Any = None) -> None:
        if item is not None:
            self._update_validation_choices()
        pairs = self.checked_pairs()
        corrected = sum(p.corrected or 0 for p in pairs)
        self.summary.setText(f"{len(pairs)} pair(s) ticked, {corrected:,} corrected pixels (weighted {self.weight_spin.value():g}x in the loss)"
                             if pairs else "tick the corrected layers to learn from")

    # -- training ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def request(self) -> FinetuneRequest:
        """The run the widget's settings describe (layers are copied now, on the GUI thread)."""
        pairs = self.checked_pairs()
        if not pairs:
            raise R2UNetError("no training pair ticked: tick a corrected Labels layer (or press 'All layers with corrections')")
        base = self.base_combo.currentData()
        if not base:
            raise R2UNetError("no base model chosen: pick a pretrained model, a version or a checkpoint file")
        data = [piece for p in pairs for piece in pair_data(self.viewer, p)]
        base_label = self.base_combo.currentText().removesuffix(" (fine-tuned)")
        out = new_version_path(Path(base).stem if base.endswith(".safetensors") else base)
        settings = dict(lr=self.lr_spin.value(), patch_size=self.patch_spin.value(), batch_size=self.batch_spin.value(),
                        steps_per_epoch=self.steps_spin.value(), correction_weight=self.weight_spin.value(),
                        freeze=self.freeze_combo.currentText())
        return FinetuneRequest(base=base, pairs=data, out=out, name=f"{base_label} + {len(data)} corrected",
                               epochs=self.epochs_spin.value(), minutes=self.minutes_spin.value() or None,
                               validation=self.validation_combo.currentData() or "none", settings=settings)

    def start(self) -> None:
        """Fine-tune in a worker thread (refused while a run or a re-segmentation is going)."""
        self._unless_busy("a fine-tuning run is already going: wait for it or press Cancel", self._start)

    def _start(self) -> None:
        from napari.qt.threading import create_worker

        request = self.request()
        self._stop.clear()
        self._finished.clear()
        worker = create_worker(finetune, request, self._bridge.event.emit, self._stop.is_set, self._finished,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_trained)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._watch_window()
        self.plot.clear()
        self._set_running(True)
        self._started = time.perf_counter()
        self.status.setText(f"preparing {len(request.pairs)} image(s) ...")
        worker.start()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        has_versions = self.version_combo.count() > 0
        for widget in (self.resegment_button, self.rename_button, self.export_button):
            widget.setEnabled(not running and has_versions)
        self.version_combo.setEnabled(not running)
        if not running:
            self.progress.setValue(0)

    def cancel(self) -> None:
        """Stop after the current step; the best checkpoint so far is kept as a version."""
        if self.running:
            self._stop.set()
            self.status.setText("cancelling: finishing the current step ...")

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until the worker thread is done (used when the viewer closes)."""
        return self._finished.wait(timeout)

    def _on_event(self, event: Any) -> None:
        kind = event.kind
        if kind == "step":
            self.plot.add_loss(event.step, event.loss, event.total_steps)
            self.progress.setValue(int(event.fraction * 1000))
            if event.step % 5 == 0 or event.step == 1:
                self.status.setText(f"epoch {event.epoch + 1}/{event.epochs}, step {event.step}/{event.total_steps}, loss {event.loss:.3f}{_eta(event.eta_s)}")
        elif kind == "start":
            self.plot.total_steps = event.total_steps
            self.status.setText(event.message)
        elif kind == "baseline" and event.metrics:
            self.plot.set_base_dice(event.metrics.get("F1", float("nan")))
            self.status.setText(f"base model: validation Dice {event.metrics.get('F1', float('nan')):.3f}; training ...")
        elif kind == "epoch" and event.metrics:
            self.plot.add_dice(event.step, event.metrics.get("F1", float("nan")))
        elif kind in ("done", "cancelled", "early_stop"):
            self._last_version = event.path
            self._finish_message = event.message

    def _on_trained(self, path: str) -> None:
        self._guard(lambda: self._trained(path))

    def _trained(self, path: str) -> None:
        if not path:
            self.status.setText("cancelled before the first training step: no version was written")
            return
        self.refresh_versions(select=path)
        self._refresh_model_menus()
        version = next((v for v in list_versions() if str(v.path) == path), None)
        seconds = time.perf_counter() - self._started
        if version is None:
            self.status.setText(f"training ended in {seconds:.0f} s but wrote no version")
            return
        scores = ""
        if "F1" in version.metrics:
            before = version.metrics_before.get("F1")
            scores = f"; validation Dice {before:.3f} -> {version.metrics['F1']:.3f}" if before is not None else f"; validation Dice {version.metrics['F1']:.3f}"
        ended = getattr(self, "_finish_message", "finished")
        self._notify_info(f"{ended} ({seconds:.0f} s): new version '{version.name}'{scores}. Re-segment the other images with it.")

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            self.status.setText("cancelled: nothing was added")
        else:
            self._notify_error(user_message(exc))

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)

    # -- closing the viewer ------------------------------------------------------------------
    def _main_window(self) -> Any:
        # napari's main window even when this dock floats (then self.window() is the dock itself)
        return getattr(self.viewer.window, "_qt_window", None) or self.window()

    def _watch_window(self) -> None:
        if self._watching_window:
            return
        window = self._main_window()
        if window is not None and window is not self:
            window.installEventFilter(self)  # no Python reference kept: the viewer must be free to go
            self._watching_window = True
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop.set)

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Close and self.running:
            # napari may still ask "close?": act once the close went through, not before
            QTimer.singleShot(0, self._after_window_close)
        return False

    def _after_window_close(self) -> None:
        window = self._main_window()
        if self.running and (window is None or not window.isVisible()):
            self.shutdown()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop a running worker and wait for it (its best checkpoint and resume state are written)."""
        self._stop.set()
        self.wait(timeout)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)

    # -- re-segment --------------------------------------------------------------------------
    def resegment_targets(self) -> list[Any]:
        """Open images to re-segment: every Image layer except training images and our outputs."""
        from napari.layers import Image

        training = {p.image for p in self.checked_pairs()}
        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and not is_output_layer(layer) and layer.name not in training]

    def resegment(self) -> None:
        self._unless_busy("wait for the running job to end (or press Cancel)", self._resegment)

    def _resegment(self) -> None:
        from napari.qt.threading import create_worker

        spec, version_name = self._chosen_version(), self.version_combo.currentText()
        targets = self.resegment_targets()
        if not targets:
            raise R2UNetError("no other image is open: open the images to segment (training images are skipped)")
        step = tuple(self.viewer.dims.current_step)
        jobs = [(layer, plan_job(layer, step, all_slices=False)) for layer in targets]
        self._stop.clear()

        bridge, cache, stop, finished = self._bridge, self._cache, self._stop, self._finished
        finished.clear()

        def run_all() -> list[tuple[Any, Any, Any, str]]:
            try:
                results = []
                for i, (layer, job) in enumerate(jobs):
                    def progress(fraction: float, i: int = i) -> None:
                        bridge.progress.emit((i + fraction) / len(jobs))

                    probs, name = segment(cache, spec, "auto", job, progress, stop.is_set, bridge.message.emit)
                    results.append((layer, job, probs, name))
                return results
            finally:
                finished.set()  # in the worker thread: shutdown() may be waiting on the GUI thread

        worker = create_worker(run_all, _start_thread=False, _ignore_errors=True)
        self._resegmenting = (spec, version_name)
        worker.returned.connect(self._on_resegmented)  # bound methods: nothing is called once the widget is gone
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._watch_window()
        self._set_running(True)
        self.status.setText(f"re-segmenting {len(jobs)} image(s) with {version_name} ...")
        worker.start()

    def _on_resegmented(self, results: list[tuple[Any, Any, Any, str]]) -> None:
        spec, name = self._resegmenting
        self._guard(lambda: self._add_resegmented(results, spec, name))

    def _on_segment_progress(self, fraction: float) -> None:
        self.progress.setValue(int(fraction * 1000))

    def _add_resegmented(self, results: list[tuple[Any, Any, Any, str]], spec: str, name: str) -> None:
        for layer, job, probs, _ in results:
            if layer.name in self.viewer.layers:
                add_result_layers(self.viewer, layer, job, probs, 0.5, name, add_probability=False, add_uncertainty=True, spec=spec)
        self.status.setText(f"re-segmented {len(results)} image(s) with {name}: new layers added, your edited layers are unchanged")

    # -- where to correct next -------------------------------------------------------------
    def next_doubtful_region(self) -> tuple[int, int] | None:
        """Centre the view on the next most uncertain window of the selected result layer."""
        from src_models.labels import predictive_entropy

        layer = self.viewer.layers.selection.active
        meta = getattr(layer, "metadata", {}).get(META_KEY) if layer is not None else None
        if not meta or "probabilities" not in meta:
            raise R2UNetError("select a Labels layer made by the Segment widget: its stored probabilities tell where the model hesitates")
        if self._doubtful_layer != layer.name or not self._doubtful:
            probs = meta["probabilities"]
            uncertainty = predictive_entropy(probs if probs.ndim == 3 else probs[tuple(int(i) for i in self.viewer.dims.current_step[: probs.ndim - 3])])
            fix = corrections(layer, tuple(self.viewer.dims.current_step))
            if fix is not None:
                uncertainty = uncertainty * ~fix.changed  # already corrected: not doubtful any more
            self._doubtful = doubtful_regions(uncertainty)
            self._doubtful_layer = layer.name
        y, x, score = self._doubtful.pop(0)
        world = layer.data_to_world([*self.viewer.dims.current_step[: layer.ndim - 2], y, x])
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        camera = scene.camera if scene is not None else self.viewer.camera
        camera.center = tuple(world[-2:])
        camera.zoom = max(camera.zoom, 2.0)
        self.status.setText(f"uncertainty {score:.2f} here ({len(self._doubtful)} more regions ranked); correct it, then press again")
        return y, x

