"""Make docs/finetune.png: the Fine-tune widget while it trains (live loss and validation Dice).

The human-in-the-loop loop on the synthetic sample: r2unet-drive (trained on fundus photographs)
segments the synthetic vessels, the labels are corrected (replaced by the sample's ground truth,
as a user would with the brush), and fine-tuning starts; the window is saved after a few epochs
and the run is cancelled (its best checkpoint stays as a version in a temporary model folder).

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/finetune_screenshot.py docs/finetune.png
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("R2UNET_MODELS_DIR", tempfile.mkdtemp(prefix="r2unet-models-"))


def main(out: str, epochs_before_shot: int = 4) -> int:
    import napari
    import napari._qt.qt_main_window as qt_main_window
    import numpy as np
    from qtpy.QtCore import QTimer

    qt_main_window.SHOW_QT_WARNING = False
    viewer = napari.Viewer(title="napari-r2unet")
    viewer.window.resize(1400, 860)
    viewer.open_sample("napari-r2unet", "synthetic_vessels")
    _, fine = viewer.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
    _, seg = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment", tabify=True)
    seg.model_combo.setCurrentIndex(seg.model_combo.findData("r2unet-drive"))
    seen = {"epochs": 0, "code": 1}

    def on_event(event) -> None:
        if event.kind == "epoch":
            seen["epochs"] += 1
            if seen["epochs"] == epochs_before_shot:
                QTimer.singleShot(300, shoot)

    def shoot() -> None:
        viewer.screenshot(out, canvas_only=False)
        print(f"saved {out}: {fine.status.text()}")
        seen["code"] = 0
        fine.cancel()
        fine._worker.finished.connect(viewer.close)

    def segmented() -> None:
        layer = viewer.layers["synthetic vessels [r2unet-drive]"]
        truth = viewer.layers["synthetic vessels truth"].data
        changed = np.nonzero(layer.data != truth)
        layer.data_setitem(changed, truth[changed])
        viewer.layers["synthetic vessels truth"].visible = False
        fine.select_corrected()
        fine.base_combo.setCurrentIndex(fine.base_combo.findData("r2unet-drive"))
        fine.epochs_spin.setValue(10)
        viewer.window.dock_widgets  # noqa: B018  (the Fine-tune tab comes to the front below)
        fine.parent().raise_() if fine.parent() is not None else None
        fine._bridge.event.connect(on_event)
        fine.start()

    seg.start()
    seg._worker.finished.connect(lambda: QTimer.singleShot(100, segmented))
    napari.run()
    return seen["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/finetune.png"))
