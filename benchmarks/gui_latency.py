"""napari event-loop latency while the Segment widget runs a model (run under xvfb-run).

Usage: xvfb-run -a .venv/bin/python benchmarks/gui_latency.py [--model r2unet-drive] [--image PATH]

A 10 ms QTimer runs on the GUI thread; its lateness (actual interval - 10 ms) is what a user
feels as lag. Measured for 2 s idle, then for the whole segmentation of the image (default: the
1411 x 1411 scikit-image retina). Prints p50, p95 and max in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or checkpoint (default: the first shipped)")
    parser.add_argument("--image", default=None)
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(show=True)
    if args.image:
        viewer.open(args.image)
    else:
        viewer.open_sample("napari-r2unet", "retina")
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    if args.model and args.model.endswith(".safetensors"):
        widget.add_model(args.model)
    elif args.model:
        widget.model_combo.setCurrentText(args.model)
    app = napari.qt.get_qapp()
    gaps: dict[str, list[float]] = {"idle": [], "inference": []}
    state = {"phase": "idle", "last": time.perf_counter(), "t0": time.perf_counter(), "run_s": 0.0}

    def tick() -> None:
        now = time.perf_counter()
        gaps[state["phase"]].append((now - state["last"]) * 1000 - 10)
        state["last"] = now
        if state["phase"] == "idle" and now - state["t0"] > 2:
            state["phase"], state["t0"] = "inference", now
            widget.start()
            widget._worker.finished.connect(done)

    def done() -> None:
        state["run_s"] = time.perf_counter() - state["t0"]
        timer.stop()
        app.quit()

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    app.exec_() if hasattr(app, "exec_") else app.exec()
    for phase, values in gaps.items():
        v = np.maximum(np.array(values[1:]), 0)
        print(f"{phase:9s}: {len(v)} ticks, lateness p50 {np.percentile(v, 50):.1f} ms, p95 {np.percentile(v, 95):.1f} ms, max {v.max():.1f} ms")
    print(f"segmentation took {state['run_s']:.1f} s; status: {widget.status.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
