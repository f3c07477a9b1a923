"""Make docs/annotate.png: the Annotate folder widget on a folder of synthetic fundus-like images.

Six synthetic vessel images (src_models.synthetic, made here) are written to a temporary
folder; the widget opens it with r2unet-drive, predicts the folder in the background, Next opens
the most uncertain image, a few pixels are corrected (autosaved) and the window is saved.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/annotate_screenshot.py docs/annotate.png
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("R2UNET_MODELS_DIR", tempfile.mkdtemp(prefix="r2unet-models-"))


def main(out: str) -> int:
    import napari
    import napari._qt.qt_main_window as qt_main_window
    import numpy as np
    from PIL import Image
    from qtpy.QtCore import QTimer

    from src_models.synthetic import vessel_image

    qt_main_window.SHOW_QT_WARNING = False
    folder = Path(tempfile.mkdtemp(prefix="r2unet-annotate-")) / "fundus"
    folder.mkdir()
    for seed in range(6):
        Image.fromarray(vessel_image((384, 384), seed=300 + seed, rgb=True)[0]).save(folder / f"patient{seed + 1:02d}.png")
    viewer = napari.Viewer(title="napari-r2unet")
    viewer.window.resize(1400, 860)
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Annotate folder")
    widget.model_combo.choose("r2unet-drive")
    widget.open_folder(str(folder))
    outcome = {"code": 1}

    def shoot() -> None:
        viewer.screenshot(out, canvas_only=False)
        print(f"saved {out}: {widget.status.text()}")
        outcome["code"] = 0
        viewer.close()

    def wait() -> None:
        if widget.predicting:
            QTimer.singleShot(200, wait)
            return
        widget.next_image()
        layer = widget._labels_layer
        rows, cols = np.nonzero(np.ones((6, 40), bool))
        layer.data_setitem((rows + 180, cols + 100), np.ones(rows.size, np.uint8))
        widget.autosave()
        QTimer.singleShot(500, shoot)

    QTimer.singleShot(200, wait)
    napari.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/annotate.png"))
