"""napari event-loop latency while the Segment widget runs a model (run under xvfb-run).

Usage: xvfb-run -a .venv/bin/python benchmarks/gui_latency.py [--model r2unet-drive] [--image PATH] [--finetune]

With ``--finetune`` the synthetic sample is segmented and corrected (its ground truth) first, and
the lateness is measured while the Fine-tune widget trains for 2 epochs (50 steps) instead.

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
    parser.add_argument("--finetune", action="store_true", help="measure during fine-tuning instead of segmentation")
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(show=True)
    if args.image:
        from napari_r2unet._io import reader_plugin

        viewer.open(args.image, plugin=reader_plugin(args.image))  # napari and we both claim .tif
    else:
        viewer.open_sample("napari-r2unet", "synthetic_vessels" if args.finetune else "retina")
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    if args.model and args.model.endswith(".safetensors"):
        widget.add_model(args.model)
    elif args.model:
        widget.model_combo.choose(args.model)  # a name ("r2unet-drive") or a menu label
    app = napari.qt.get_qapp()
    if args.finetune:
        import os
        import tempfile

        os.environ.setdefault("R2UNET_MODELS_DIR", tempfile.mkdtemp(prefix="r2unet-models-"))
        widget.start()
        while widget.running:
            app.processEvents()
            time.sleep(0.01)
        result = next(layer for layer in viewer.layers if layer.name.startswith("synthetic vessels ["))
        truth = viewer.layers["synthetic vessels truth"].data
        changed = np.nonzero(result.data != truth)
        result.data_setitem(changed, truth[changed])
        _, trainer = viewer.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
        trainer.select_corrected()
        trainer.epochs_spin.setValue(2)
        widget = trainer  # measure this one
    gaps: dict[str, list[float]] = {"idle": [], "inference": []}
    when: dict[str, list[float]] = {"idle": [], "inference": []}  # seconds into the phase
    state = {"phase": "idle", "last": time.perf_counter(), "t0": time.perf_counter(), "run_s": 0.0}

    def tick() -> None:
        now = time.perf_counter()
        gaps[state["phase"]].append((now - state["last"]) * 1000 - 10)
        when[state["phase"]].append(now - state["t0"])
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
        worst = when[phase][1:][int(np.argmax(v))]
        print(f"{phase:9s}: {len(v)} ticks, lateness p50 {np.percentile(v, 50):.1f} ms, p95 {np.percentile(v, 95):.1f} ms, "
              f"max {v.max():.1f} ms ({worst:.1f} s into the phase)")
    print(f"segmentation took {state['run_s']:.1f} s; status: {widget.status.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
