"""Parts of `make bench` (benchmarks/bench.py) for issue 16: the first image of a fresh process,
and bf16 inference and training where the CPU has native bf16.

- :func:`first_image`: a child process imports torch (process start and that import excluded:
  every Python program pays them), then times ``r2unet predict`` of one image from the CLI's
  import on (model load, backend session, graph cache, first run), then the marginal time of the
  same image with the loaded model (best of 3): the ratio of the two.
- :func:`bf16_rows`: on a CPU with native bf16, bf16 inference time / the fp32 roofline, masks
  against fp32, and a training step in bf16 autocast against fp32; elsewhere one row saying so.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

FIRST_IMAGE_CODE = """
import sys, time
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {root!r})
start = time.perf_counter()
from src_models.cli import main
assert main(['predict', {model!r}, {image!r}, '--out', {out!r}, '--precision', {precision!r}]) == 0
first = time.perf_counter() - start
from src_models.inference import Segmenter
from src_models.model_names import load_model
from src_models.predict import PredictOptions, predict_file
segmenter = Segmenter(load_model({model!r}), device='cpu', precision={precision!r})
warm = []
for _ in range(4):
    start = time.perf_counter()
    predict_file(segmenter, {image!r}, {out!r} + '/warm.tif', None, PredictOptions())
    warm.append(time.perf_counter() - start)
print('RESULT', first, min(warm[1:]))
"""


def first_image(model: str, image: Path, out: Path, threads: int, precision: str = "auto") -> tuple[float, float]:
    """(first image of a fresh process, warm image) in seconds, with ``--precision precision``
    (auto: the CLI's default path, bf16 on OpenVINO where the CPU has native bf16); the graph cache
    already exists.
    Our modules are byte-compiled first, as pip leaves an installed package: where the shell sets
    PYTHONDONTWRITEBYTECODE (this project's CI machines do), every process would otherwise compile
    them again, 0.15 s that no installed copy pays."""
    import compileall

    compileall.compile_dir(str(ROOT / "src_models"), quiet=1)
    code = FIRST_IMAGE_CODE.format(threads=threads, root=str(ROOT), model=model, image=str(image), out=str(out), precision=precision)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(result.stderr[-2000:])
    _, first, warm = line.split()
    return float(first), float(warm)


def bf16_rows(checkpoint, image_path: Path, out: Path, roofline: float, fp32_seconds: float, repeat: int,
              targets: dict[str, float]) -> tuple[list[tuple[str, str, str, str]], dict[str, bool]]:
    """Rows (measure, result, target, detail) and verdicts of the bf16 measures."""
    import torch

    from src_models.inference import Segmenter
    from src_models.precision import cpu_has_native_bf16
    from src_models.predict import PredictOptions, predict_file

    isa = torch.backends.cpu.get_cpu_capability()
    if not cpu_has_native_bf16():
        return [("(f) bf16 inference and training", "not run", f"<= {targets['f']}x roofline, >= {targets['g']}x step",
                 f"this CPU ({isa}) has no native bf16 (AMX, AVX-512 BF16): --precision auto keeps fp32 here")], {}
    bf16 = Segmenter(checkpoint, device="cpu", precision="bf16")  # what --precision auto runs here: OpenVINO where installed
    eager = Segmenter(checkpoint, device="cpu", backend="torch", precision="bf16")
    compiled = Segmenter(checkpoint, device="cpu", backend="torch", precision="bf16", compile=True)
    fp32 = Segmenter(checkpoint, device="cpu", backend="torch", precision="fp32")
    options = PredictOptions()
    first_s = _timed(lambda: predict_file(bf16, image_path, out / "bf16.tif", None, options))  # OpenVINO compiles this shape
    compile_s = _timed(lambda: predict_file(compiled, image_path, out / "bf16.tif", None, options))  # inductor compiles it
    predict_file(eager, image_path, out / "bf16.tif", None, options)  # warm
    times: dict[str, list[float]] = {"bf16": [], "compiled": [], "eager": []}
    for _ in range(repeat):  # alternating: the host's speed drifts
        for name, segmenter in (("bf16", bf16), ("compiled", compiled), ("eager", eager)):
            times[name].append(_timed(lambda s=segmenter: predict_file(s, image_path, out / "bf16.tif", None, options)))
    best, best_compiled, best_eager = (min(times[k]) for k in ("bf16", "compiled", "eager"))
    from src_models.data import read_image

    image = read_image(image_path)
    a, b = fp32.predict(image)[0], bf16.predict(image)[0]
    threshold = checkpoint.model_card.threshold
    agree = float(((a >= threshold) == (b >= threshold)).mean())
    step32, step16 = _train_step(checkpoint, "fp32"), _train_step(checkpoint, "bf16")
    ratio_f, ratio_g = best / roofline, step32 / step16
    rows = [("(f) bf16 predict / fp32 roofline", f"{ratio_f:.2f}x", f"<= {targets['f']}x",
             f"{best:.3f} s {bf16.backend} (fp32 ours {fp32_seconds:.3f} s; bf16 PyTorch compiled {best_compiled:.3f} s, eager "
             f"{best_eager:.3f} s; the first image {first_s:.2f} s, compiling PyTorch's {compile_s:.1f} s); masks agree with fp32 "
             f"on {agree:.3%} of pixels ({isa})"),
            ("(g) training step fp32 / bf16 autocast", f"{ratio_g:.2f}x", f">= {targets['g']}x",
             f"{step32:.3f} s vs {step16:.3f} s per step of 8 x 96^2")]
    return rows, {"(f)": ratio_f <= targets["f"], "(g)": ratio_g >= targets["g"]}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _train_step(checkpoint, precision: str, steps: int = 8) -> float:
    """Median seconds per training step of 8 x 96^2 patches from ``checkpoint``'s weights."""
    import tempfile

    from src_models.synthetic import vessel_image
    from src_models.training import EventKind, TrainConfig, Trainer, make_sample

    image, mask = vessel_image((256, 256), n_vessels=10, seed=2, rgb=True)
    samples = [make_sample(f"s{i}", image, mask, checkpoint.preprocess, channel_axis=-1) for i in range(2)]
    config = TrainConfig(batch_size=8, patch_size=96, epochs=1, steps_per_epoch=steps, val_fraction=0.0, warmup_steps=1,
                         precision=precision)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(None, None, samples, config, Path(work) / "t.safetensors", base=checkpoint)
        stamps = [time.perf_counter()] + [time.perf_counter() for e in trainer.run() if e.kind == EventKind.STEP]
    return float(np.median(np.diff(stamps[2:])))
