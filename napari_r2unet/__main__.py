"""``python -m napari_r2unet [IMAGE ...] [--screenshot PNG]``: napari with the Segment, Fine-tune and Annotate folder widgets.

Without images it opens the retina sample. With ``--screenshot`` it segments the first image
with the default model, saves a PNG of the whole window and exits (0 on success): the headless
check of the plugin's main job (run it under ``xvfb-run``).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_r2unet", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="image files to open (default: the retina sample)")
    parser.add_argument("--screenshot", metavar="PNG", help="segment, save a screenshot of the window and exit")
    parser.add_argument("--model", default=None, help="model for --screenshot (default: the first shipped one)")
    args = parser.parse_args(argv)

    import napari

    if args.screenshot:  # a clean picture: no toast about Qt bindings over the canvas (cosmetic only)
        try:
            import napari._qt.qt_main_window as qt_main_window

            qt_main_window.SHOW_QT_WARNING = False
        except (ImportError, AttributeError):
            pass
    viewer = napari.Viewer(title="napari-r2unet")
    viewer.window.resize(1400, 860)
    if args.images:
        from ._io import reader_plugin

        for path in args.images:
            viewer.open(path, plugin=reader_plugin(path))
    else:
        viewer.open_sample("napari-r2unet", "retina")
    viewer.window.add_plugin_dock_widget("napari-r2unet", "Annotate folder")
    viewer.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune", tabify=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment", tabify=True)
    if not args.screenshot:
        napari.run()
        return 0
    if args.model:  # a checkpoint file or bioimage.io package, or a menu entry by name or label ("r2unet-drive")
        from ._models import is_model_file

        chosen = widget._guard(lambda: widget.add_model(args.model) if is_model_file(args.model)
                               else widget.model_combo.choose(args.model))
        if chosen is None:
            print(f"segmentation failed: {widget.status.text()}", file=sys.stderr)
            viewer.close()
            return 1
    outcome = {"code": 1}

    def finish() -> None:
        if any(layer.__class__.__name__ == "Labels" for layer in viewer.layers):
            viewer.screenshot(args.screenshot, canvas_only=False)
            outcome["code"] = 0
            print(f"saved {args.screenshot}: {widget.status.text()}")
        else:
            print(f"segmentation failed: {widget.status.text()}", file=sys.stderr)
        viewer.close()

    from qtpy.QtWidgets import QApplication

    while widget._warming:  # the chosen model still loads in the background: start when it is warm
        QApplication.processEvents()
        time.sleep(0.01)
    widget.start()
    if widget._worker is None:  # refused before starting (no model, no image): the status says why
        print(f"segmentation failed: {widget.status.text()}", file=sys.stderr)
        viewer.close()
        return 1
    widget._worker.finished.connect(finish)
    napari.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
