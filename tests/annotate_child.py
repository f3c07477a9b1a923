"""A real napari process for the kill -9 test: open a folder, Next, edit, let autosave run, report.

``python tests/annotate_child.py IMAGES CHECKPOINT REPORT``: once the edit has been autosaved
(1 s autosave, then 2.5 s more) it writes REPORT (JSON: the image and the edited labels' file)
and keeps running until it is killed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QTimer


def main() -> None:
    images, checkpoint, report = sys.argv[1:4]
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Annotate folder")
    widget.model_combo.add_file(checkpoint)
    widget.set_autosave_seconds(1)
    widget.open_folder(images)

    def edit() -> None:
        if widget.predicting:
            QTimer.singleShot(100, edit)
            return
        widget.next_image()
        layer = widget._labels_layer
        rows, cols = np.nonzero(np.ones((8, 8), bool))
        layer.data_setitem((rows + 4, cols + 4), (1 - np.asarray(layer.data)[rows + 4, cols + 4]).astype(np.uint8))
        edited = np.array(layer.data)
        np.save(Path(report).with_suffix(".npy"), edited)

        def done() -> None:
            Path(report).write_text(json.dumps({"image": widget.current, "pid": __import__("os").getpid()}))

        QTimer.singleShot(2500, done)

    QTimer.singleShot(0, edit)
    napari.run()


if __name__ == "__main__":
    main()
