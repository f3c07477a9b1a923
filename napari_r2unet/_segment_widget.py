"""The Segment widget: pick an image and a model, segment in a worker thread, get editable labels.

The network runs in a napari worker thread (torch is imported there, not at napari start-up);
progress shows in the widget and in napari's activity dock (a busy bar while the first or only
tile runs); Cancel stops within a fraction of a second, even inside a tile; the
threshold slider re-derives the labels from the stored probabilities without running the
network again. Errors become one-line napari notifications.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from src_models.errors import CancelledError, R2UNetError  # torch-free
from src_models.resources import require_memory

from ._layers import META_KEY, add_result_layers, fill_unlabelled, labels_from, plan_job, result_bytes, rethreshold
from ._models import ModelChoice, model_classes
from ._widget_common import ModelMenu, Notifying, user_message
from ._worker import SegmenterCache, available_devices, segment

if TYPE_CHECKING:
    import napari

NEW_LAYER = "new Labels layer"


class _Bridge(QObject):
    """Signals emitted from the worker thread, delivered on the GUI thread."""

    progress = Signal(float)
    message = Signal(str)


class SegmentWidget(Notifying, QWidget):
    """Dock widget: image -> model -> Labels layer (and probability map)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._cache = SegmenterCache()
        self._worker: Any = None
        self._stop = threading.Event()
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._on_progress)
        self._bridge.message.connect(self._notify_info)
        self._progress_bar: Any = None
        self._build()
        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed, self.viewer.layers.events.reordered):
            event.connect(self._refresh_layers)
        self._detect_devices()
        self.destroyed.connect(self._stop.set)  # a closed viewer stops a running segmentation
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop.set)

    # -- UI ----------------------------------------------------------------------------------
    def _build(self) -> None:
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("the Image layer to segment")
        form.addRow("image", self.image_combo)
        self.model_combo = ModelMenu(self._guard)
        form.addRow("model", self.model_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"])
        self.device_combo.setToolTip("auto: CUDA > Apple MPS > CPU")
        form.addRow("device", self.device_combo)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 8192)
        self.tile_spin.setSingleStep(128)
        self.tile_spin.setSpecialValueText("auto")
        self.tile_spin.setToolTip("largest tile side in pixels, tiles evened out; auto = whole image up to 1536 x 1536 if memory allows, else 1280")
        form.addRow("tile", self.tile_spin)
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(-0.05, 0.9)  # the minimum stands for "auto"
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setSpecialValueText("auto")
        self.overlap_spin.setValue(-0.05)
        self.overlap_spin.setToolTip("overlap of neighbouring tiles, as a fraction of the largest tile; auto = 192 pixels (0.15 of 1280)")
        form.addRow("overlap", self.overlap_spin)
        threshold_row = QHBoxLayout()
        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(1, 99)
        self.threshold_slider.setValue(50)
        self.threshold_label = QLabel("0.50")
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        threshold_row.addWidget(self.threshold_slider)
        threshold_row.addWidget(self.threshold_label)
        form.addRow("threshold", threshold_row)
        self.target_combo = QComboBox()
        self.target_combo.setToolTip("write into a new layer, or fill only the unlabelled (0) pixels of an existing one")
        form.addRow("output", self.target_combo)
        self.all_slices = QCheckBox("all slices (stacks, time series)")
        form.addRow("", self.all_slices)
        self.add_probability = QCheckBox("add probability map")
        self.add_probability.setChecked(True)
        form.addRow("", self.add_probability)
        self.add_uncertainty = QCheckBox("add uncertainty map (where to correct first)")
        self.add_uncertainty.setToolTip("entropy of the predicted probability: bright where the model hesitates")
        form.addRow("", self.add_uncertainty)
        self.tta = QCheckBox("test-time augmentation (4 flips: 4x slower, steadier)")
        self.tta.setToolTip("average the predictions of the 4 flipped images; the uncertainty map then also shows where they disagree")
        form.addRow("", self.tta)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Segment")
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.status = QLabel("Open an image, choose a model, press Segment.")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def refresh_models(self, select: str | None = None) -> None:
        """Re-list pretrained models, fine-tuned versions and opened files; ``select`` a spec."""
        self.model_combo.refresh(select)

    def add_model(self, path: str) -> ModelChoice:
        """Offer a checkpoint file as a model (the reader and 'Load checkpoint...' use this)."""
        return self.model_combo.add_file(path)

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Image, Labels

        current = self.image_combo.currentText()
        self.image_combo.clear()
        self.image_combo.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)])
        if current:
            self.image_combo.setCurrentText(current)
        target = self.target_combo.currentText()
        self.target_combo.clear()
        self.target_combo.addItem(NEW_LAYER)
        self.target_combo.addItems([f"fill {layer.name}" for layer in self.viewer.layers if isinstance(layer, Labels)])
        if target:
            self.target_combo.setCurrentText(target)

    def _detect_devices(self) -> None:
        """Ask torch for accelerators in a worker (torch's import stays off the GUI thread)."""
        from napari.qt.threading import create_worker

        worker = create_worker(available_devices, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._set_devices)
        worker.errored.connect(lambda exc: None)  # keep auto/cpu
        worker.start()

    def _set_devices(self, devices: list[str]) -> None:
        current = self.device_combo.currentText()
        self.device_combo.clear()
        self.device_combo.addItems(["auto", *devices])
        self.device_combo.setCurrentText(current)

    # -- run -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _image_layer(self) -> Any:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise R2UNetError("no Image layer to segment: open an image first (File > Open, or File > Open Sample)")
        return self.viewer.layers[name]

    def start(self) -> None:
        """Segment the chosen image in a worker thread (refused while one runs)."""
        self._unless_busy("a segmentation is already running: wait for it or press Cancel", self._start)

    def _start(self) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        image = self._image_layer()
        spec = self.model_combo.currentData()
        if spec is None:
            raise R2UNetError("no model chosen: pick a pretrained model or load a checkpoint")
        job = plan_job(image, tuple(self.viewer.dims.current_step), self.all_slices.isChecked())
        overlap = self.overlap_spin.value()
        job.options = {"tile": self.tile_spin.value() or None, "overlap": None if overlap < 0 else overlap}
        require_memory(result_bytes(job, model_classes(spec), self.add_probability.isChecked(), self.add_uncertainty.isChecked()),
                       f"the result for {image.name} {job.spatial_shape}",
                       "segment the current slice only, untick the probability/uncertainty maps, or crop the image")
        target = self._target_layer()
        if target is not None and tuple(target.data.shape) != job.spatial_shape:
            raise R2UNetError(f"labels layer {target.name!r} has shape {tuple(target.data.shape)} but the image {job.spatial_shape}; choose a new layer")
        self._stop.clear()
        device = self.device_combo.currentText()
        job.options["tta"] = self.tta.isChecked()
        worker = create_worker(segment, self._cache, spec, device, job, self._bridge.progress.emit,
                               self._stop.is_set, self._bridge.message.emit, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._on_done(image, job, target, spec, result))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._progress_bar = progress(total=1000, desc=f"Segmenting {image.name}")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the first tile is done: an image that runs whole has one
        self.status.setText(f"segmenting {image.name} with {self.model_combo.currentText()} ...")
        worker.start()

    def _target_layer(self) -> Any:
        text = self.target_combo.currentText()
        if not text or text == NEW_LAYER:
            return None
        return self.viewer.layers[text.removeprefix("fill ")]

    def cancel(self) -> None:
        """Ask the worker to stop; it ends within a fraction of a second (inside a tile) and adds nothing."""
        if self.running:
            self._stop.set()
            self.status.setText("cancelling ...")

    def _on_progress(self, fraction: float) -> None:
        value = int(round(fraction * 1000))
        self.progress.setRange(0, 1000)
        self.progress.setValue(value)
        if self._progress_bar is not None:
            self._progress_bar.update(max(0, value - self._progress_bar.n))

    def _on_done(self, image: Any, job: Any, target: Any, spec: str, result: tuple[Any, str]) -> None:
        self._guard(lambda: self._apply(image, job, target, spec, result))

    def _apply(self, image: Any, job: Any, target: Any, spec: str, result: tuple[Any, str]) -> None:
        probs, model_name = result
        threshold = self.threshold
        if target is None:
            layer = add_result_layers(self.viewer, image, job, probs, threshold, model_name, self.add_probability.isChecked(),
                                      self.add_uncertainty.isChecked(), spec)
            fraction = float((layer.metadata[META_KEY]["prediction"] > 0).mean())
            self.status.setText(f"done: {layer.name} ({fraction:.1%} foreground). Correct it with the brush, then save or fine-tune.")
        else:
            filled = fill_unlabelled(target, job, labels_from(probs, threshold))
            self.status.setText(f"done: filled {filled} unlabelled pixels of {target.name}; painted pixels kept (Ctrl+Z undoes)")

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            self.status.setText("cancelled: nothing was added")
        else:
            self._notify_error(user_message(exc))

    def _on_finished(self) -> None:
        self._worker = None
        self.progress.setRange(0, 1000)
        if self._progress_bar is not None:
            self._progress_bar.close()
            self._progress_bar = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    # -- threshold -------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.threshold_slider.value() / 100.0

    def _on_threshold(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100:.2f}")
        layer = self.viewer.layers.selection.active
        if layer is not None and META_KEY in getattr(layer, "metadata", {}):
            self._guard(lambda: rethreshold(layer, self.threshold))

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.cancel()
        super().closeEvent(event)
