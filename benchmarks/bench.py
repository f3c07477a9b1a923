"""`make bench`: CPU performance of R2U-Net as ratios measured in ONE run, written to docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/bench.py            # the full suite (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench.py --smoke    # tiny sizes, prints only (CI runs this)

(a) our end-to-end prediction of a DRIVE-sized image (read, preprocess, tile, infer, blend,
    threshold, write: `src_models.predict.predict_file`, what the CLI runs, model already loaded) / the roofline time
    (model FLOPs / the sgemm FLOP/s measured now); a cold `r2unet predict` is printed too;
(b) a plain eager-PyTorch forward of the same network (fp32, as public implementations run it) /
    our end-to-end time: how much faster we are;
(c) per-pixel time of `r2unet predict` on an 8192 x 8192 RGB image / that of (a), and its peak RSS;
(d) training throughput (pixels/s) and achieved FLOP/s (3x the forward FLOPs) / the sgemm FLOP/s;
(e) napari event-loop lateness p95 while the Segment widget runs (benchmarks/gui_latency.py under
    xvfb-run; skipped without it);
(a'') the first image of a fresh process (after `import torch`) / a warm image in the same child process;
     the median of five such processes;
(f), (g) where the CPU has native bf16: bf16 predict / the fp32 roofline, and the fp32 / bf16
    training step (benchmarks/bench_precision.py); elsewhere a row says why they were not run.

Absolute times on shared machines are noisy; each ratio's two sides are measured in the same
process, with the same threads; (a), (b) and sgemm at the start and again at the end of the run,
each keeping its best time (a neighbour's load lasts minutes here).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DRIVE = ROOT.parent / "shared" / "datasets" / "DRIVE"
FIRST_IMAGE_PROCESSES = 5  # (a''): the median of this many fresh processes
NOTES = "## Notes"  # docs/BENCHMARKS.md from this heading on is written by hand and kept by each run
TARGETS = {"a": 1.2, "a_first": 1.3, "c": 1.15, "c_image": 1.4, "c_rss_gb": 2.0, "d": 0.5, "e_ms": 100.0, "f": 0.6, "g": 1.5}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sgemm_flops(threads: int, n: int = 2048) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # wake the thread pool and the caches
        torch.mm(a, b)
    return 2 * n**3 / best_of(lambda: torch.mm(a, b), 8)


def machine(threads: int) -> str:
    import torch
    from results_io import cpu_name

    cpu = cpu_name()
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "not installed"
    from src_models.precision import cpu_has_native_bf16

    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return (f"{cpu}, ISA {isa} ({bf16}), {os.cpu_count()} logical CPUs, {threads} threads; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort}")


def drive_sized_image(work: Path) -> Path:
    from PIL import Image

    from src_models.synthetic import vessel_image

    candidates = sorted((DRIVE / "test" / "images").glob("01_*")) if DRIVE.is_dir() else []
    if candidates:
        return candidates[0]
    path = work / "fundus-sized.png"
    Image.fromarray(vessel_image((584, 565), n_vessels=14, seed=0, rgb=True)[0]).save(path)
    return path


def forward_flops(config, height: int, width: int) -> float:
    from src_models.nets import flops_per_megapixel
    from src_models.settings import padded_size

    m = config.size_multiple
    return flops_per_megapixel(config) * padded_size(height, m) * padded_size(width, m) / 1e6


def tiling_overhead(segmenter, side: int) -> float:
    """Pixels the network computes for a side x side image at the default tiling / the image's pixels."""
    grid = segmenter.tile_grid(side, side)  # exactly the tiling Segmenter.predict runs
    return (len(grid.ys) * grid.tile[0]) * (len(grid.xs) * grid.tile[1]) / side**2


def child_rss_predict(model: str, image: Path, out: Path, threads: int) -> tuple[float, float]:
    """Wall time and peak RSS (GB) of `r2unet predict --precision fp32` in a child process (the backend of (a))."""
    code = (
        f"import resource, sys, time, torch; torch.set_num_threads({threads}); from src_models.cli import main; t = time.perf_counter(); "
        f"rc = main(['predict', {model!r}, {str(image)!r}, '--out', {str(out)!r}, '--precision', 'fp32']); "
        "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=3600)
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(result.stderr[-2000:])
    _, seconds, rss, rc = line.split()
    assert rc == "0", result.stderr[-2000:]
    return float(seconds), float(rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no docs written (for CI)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--large", type=int, default=8192, help="side of the large image for (c)")
    parser.add_argument("--no-gui", action="store_true", help="skip (e)")
    args = parser.parse_args()
    if args.smoke:
        args.large, args.no_gui = 1024, True

    import torch

    from src_models.cli import main as cli
    from src_models.data import read_image
    from src_models.model_names import load_model

    threads = args.threads
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="r2unet-bench-"))
    rows: list[tuple[str, str, str, str]] = []
    gemm_n = 1024 if args.smoke else 2048
    peaks = [sgemm_flops(threads, gemm_n)]
    print(f"sgemm: {peaks[0] / 1e9:.1f} GFLOP/s on {threads} threads")

    model = "r2unet-drive"
    checkpoint = load_model(model)
    image_path = drive_sized_image(work)
    h, w = read_image(image_path).shape[:2]
    flops = forward_flops(checkpoint.config, h, w)
    out = work / "out"
    start = time.perf_counter()
    cli(["predict", model, str(image_path), "--out", str(out)])  # also warms the caches (ONNX export)
    cold = time.perf_counter() - start
    from src_models.inference import Segmenter
    from src_models.predict import PredictOptions, predict_file

    options = PredictOptions()  # what 'r2unet predict' runs by default
    segmenter = Segmenter(checkpoint, device="cpu", precision="fp32")  # (a) is the fp32 path on every CPU; bf16 is (f)
    ours = best_of(lambda: predict_file(segmenter, image_path, out / "mask.tif", None, options), 2 if args.smoke else 3)
    peaks.append(sgemm_flops(threads, gemm_n))  # right next to (a): the two sides of its ratio
    print(f"(a) predict {h}x{w}: {ours:.3f} s for {flops / 1e9:.1f} GFLOP (backend {segmenter.backend}); cold 'r2unet predict' "
          f"(process start excluded, model loading included): {cold:.3f} s")

    from src_models.preprocessing import preprocess

    net = checkpoint.build("cpu")
    x = torch.from_numpy(preprocess(read_image(image_path), checkpoint.preprocess))[None]
    with torch.inference_mode():
        net(x)
        eager = best_of(lambda: net(x), 2 if args.smoke else 3)
    ratio_b = eager / ours
    print(f"(b) eager PyTorch forward: {eager:.3f} s: ours is {ratio_b:.2f}x faster")

    big = work / "large.tif"
    import tifffile

    from src_models.synthetic import vessel_image

    tile = vessel_image((1024, 1024), n_vessels=20, seed=1, rgb=True)[0]
    reps = -(-args.large // 1024)
    tifffile.imwrite(big, np.tile(tile, (reps, reps, 1))[: args.large, : args.large])
    del tile
    seconds, rss = child_rss_predict(model, big, work / "out_large", threads)
    per_px_large, per_px_small = seconds / args.large**2, ours / (h * w)
    ratio_c = per_px_large / per_px_small
    computed = tiling_overhead(segmenter, args.large)
    print(f"(c) predict {args.large}^2: {seconds:.1f} s, {per_px_large * 1e9:.1f} ns/px vs {per_px_small * 1e9:.1f} ns/px: {ratio_c:.2f}x; "
          f"peak RSS {rss:.2f} GB; the tiles cover {computed:.2f}x the image's pixels (overlap), so {ratio_c / computed:.2f}x per computed pixel")

    from src_models.training import EventKind, TrainConfig, Trainer, make_sample

    train_image, train_mask = vessel_image((256, 256), n_vessels=10, seed=2, rgb=True)
    samples = [make_sample(f"s{i}", train_image, train_mask, checkpoint.preprocess, channel_axis=-1) for i in range(2)]
    steps = 4 if args.smoke else 24
    config = TrainConfig(batch_size=8, patch_size=96, epochs=1, steps_per_epoch=steps, val_fraction=0.0, warmup_steps=1)
    trainer = Trainer(None, None, samples, config, work / "train.safetensors", base=checkpoint)
    stamps = [time.perf_counter()] + [time.perf_counter() for event in trainer.run() if event.kind == EventKind.STEP]
    step_s = float(np.median(np.diff(stamps[2:])))  # the first steps warm up
    from torch.utils.data import DataLoader

    loader = DataLoader(trainer.dataset, batch_size=config.batch_size, num_workers=0)  # what run() draws each step
    start = time.perf_counter()
    loaded = sum(1 for _ in loader)
    load_s = (time.perf_counter() - start) / loaded
    pixels = config.batch_size * config.patch_size**2 / step_s
    achieved = 3 * forward_flops(checkpoint.config, config.patch_size, config.patch_size) * config.batch_size / step_s
    peaks.append(sgemm_flops(threads, gemm_n))
    peak = max(peaks)  # the hardware limit: the best sgemm seen in this run
    # the shared machine slows down for minutes at a time: (a) and (b) are measured again here, ten
    # minutes later, and each keeps its best time, as the roofline keeps the best sgemm
    repeat = 2 if args.smoke else 3
    ours = min(ours, best_of(lambda: predict_file(segmenter, image_path, out / "mask.tif", None, options), repeat))
    with torch.inference_mode():
        eager = min(eager, best_of(lambda: net(x), repeat))
    ratio_b = eager / ours
    per_px_small = ours / (h * w)
    ratio_c = per_px_large / per_px_small
    print(f"(a)/(b) measured again at the end: best {ours:.3f} s ours, {eager:.3f} s eager: (b) {ratio_b:.2f}x; "
          f"(c) {ratio_c:.2f}x per image pixel, {ratio_c / computed:.2f}x per computed pixel")
    roofline = flops / peak
    ratio_a, ratio_d = ours / roofline, achieved / peak
    print(f"(a) {ours:.3f} s / roofline {roofline:.3f} s = {ratio_a:.2f}x the roofline (sgemm best {peak / 1e9:.1f} GFLOP/s)")
    print(f"(d) training: {step_s:.3f} s/step, {pixels / 1e3:.0f} kpx/s, {achieved / 1e9:.1f} GFLOP/s = {ratio_d:.0%} of sgemm; "
          f"drawing a batch takes {load_s * 1e3:.1f} ms ({load_s / step_s:.1%} of a step)")
    from bench_precision import bf16_rows, first_image

    # five fresh processes, each its own first/warm ratio; the median is judged (one process is one noisy
    # sample: the same code measured 1.27x to 1.51x in fresh processes a minute apart, 2026-12-08)
    samples = sorted((f / w, f, w) for f, w in (first_image(model, image_path, work / "out_first", threads, "fp32")
                                                 for _ in range(1 if args.smoke else FIRST_IMAGE_PROCESSES)))
    ratio_first, first, warm = samples[len(samples) // 2]
    print(f"(a'') first image of a fresh process {first:.3f} s, warm {warm:.3f} s: {ratio_first:.2f}x (median of "
          f"{', '.join(f'{r:.2f}x' for r, _, _ in samples)})")
    from src_models.inference import Segmenter as _Segmenter

    default_rows = []
    if _Segmenter(checkpoint, device="cpu", precision="auto").precision != "fp32":  # the CLI's default path is another
        first_image(model, image_path, work / "out_first", threads, "auto")  # its cache (OpenVINO's marked graph) filled
        runs = sorted((f / w, f, w) for f, w in (first_image(model, image_path, work / "out_first", threads, "auto")
                                                  for _ in range(1 if args.smoke else 3)))
        ratio_auto, first_auto, warm_auto = runs[len(runs) // 2]
        print(f"(a'') default path: first image {first_auto:.3f} s, warm {warm_auto:.3f} s: {ratio_auto:.2f}x")
        default_rows = [("(a'') the same, default path (bf16 here)", f"{ratio_auto:.2f}x", "-",
                         f"{first_auto:.3f} s vs {warm_auto:.3f} s (`--precision auto`); its first image takes "
                         f"{first_auto / first:.2f}x the fp32 path's first, its warm ones {warm_auto / warm:.2f}x")]
    precision_rows, precision_verdicts = bf16_rows(checkpoint, image_path, out, roofline, ours, repeat, TARGETS)
    for row in precision_rows:
        print(" ".join(row))
    rows += [
        ("(a) end-to-end predict / roofline", f"{ratio_a:.2f}x", f"<= {TARGETS['a']}x",
         f"{ours:.3f} s vs {roofline:.3f} s ({flops / 1e9:.1f} GFLOP at {peak / 1e9:.0f} GFLOP/s); backend {segmenter.backend}"),
        ("(a') the same, cold (loading the model too)", f"{cold / roofline:.2f}x", "-", f"{cold:.3f} s"),
        ("(a'') first image of a fresh process / a warm one", f"{ratio_first:.2f}x", f"<= {TARGETS['a_first']}x",
         f"{first:.3f} s (from the CLI's import: model, session, first run) vs {warm:.3f} s; median of "
         f"{', '.join(f'{r:.2f}x' for r, _, _ in samples)} in {len(samples)} fresh processes; `--precision fp32`"),
        *default_rows,
        ("(b) eager PyTorch forward / ours", f"{ratio_b:.2f}x", "-",
         f"{eager:.3f} s vs {ours:.3f} s; eager runs at {eager / roofline:.2f}x the roofline here, and (b) = {eager / roofline:.2f}x / (a): "
         f"beating eager by more than {eager / roofline:.2f}x takes a backend faster than the roofline time (ours is at {ratio_a:.2f}x)"),
        (f"(c) per computed pixel at {args.large}^2 / (a)", f"{ratio_c / computed:.2f}x", f"<= {TARGETS['c']}x",
         f"{seconds:.1f} s for {args.large**2 / 1e6:.0f} MP; the overlapping tiles compute {computed:.2f}x its pixels"),
        (f"(c) per image pixel at {args.large}^2 / (a)", f"{ratio_c:.2f}x", f"<= {TARGETS['c_image']}x",
         "the issue's accepted bound for the overlap (see the tiles below)"),
        (f"(c) peak RSS at {args.large}^2", f"{rss:.2f} GB", f"< {TARGETS['c_rss_gb']} GB", "child process, ru_maxrss"),
        ("(d) training FLOP/s / sgemm", f"{ratio_d:.0%}", f">= {TARGETS['d']:.0%}",
         f"{pixels / 1e3:.0f} kpx/s, {step_s:.3f} s per step of 8 x 96^2; drawing the batch {load_s * 1e3:.1f} ms of it"),
        *precision_rows,
    ]

    if not args.no_gui and shutil.which("xvfb-run"):
        result = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1400x900x24", sys.executable, str(ROOT / "benchmarks" / "gui_latency.py"),
                                 "--model", model], capture_output=True, text=True, cwd=ROOT, timeout=1800)
        match = re.search(r"inference: .*p95 ([0-9.]+) ms, max ([0-9.]+) ms", result.stdout)
        if match:
            p95 = float(match.group(1))
            print(f"(e) GUI lateness during inference: p95 {p95:.1f} ms, max {match.group(2)} ms")
            rows.append(("(e) napari event-loop lateness p95", f"{p95:.1f} ms", f"< {TARGETS['e_ms']:.0f} ms", f"max {match.group(2)} ms; 1411^2 retina"))
        else:
            print("(e) failed:", result.stdout[-500:], result.stderr[-1500:])
    else:
        print("(e) skipped (no xvfb-run or --no-gui)")

    shutil.rmtree(work, ignore_errors=True)
    if args.smoke:
        return 0
    lines = [
        "# Benchmarks", "",
        f"Made by `make bench` (`.venv/bin/python benchmarks/bench.py`) on {time.strftime('%Y-%m-%d')}.", "",
        f"Machine: {machine(threads)}.", "",
        f"Model: `{model}` (R2U-Net, widths 16-256, t = 2); image for (a)/(b): `{image_path.name}`, {h} x {w}.",
        "Every ratio's two sides were measured in this same run; (a), (b) and sgemm at its start and end, keeping the best.",
        "FLOPs are counted by torch's",
        "FlopCounterMode on the padded image (592 x 576 for DRIVE; our decoder upsamples with 2x2",
        "transposed convolutions, so R2U-Net counts fewer FLOPs than copies that add a 3x3 conv there).",
        "The machine is shared: sgemm speed moved during the run, so each ratio is only as steady as that.",
        f"sgemm (2048^3, float32) measured 3 times in the run: {', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s; the roofline uses the best.", "",
        "| measure | result | target | detail |", "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "",
        "How we get there, and why each dependency:", "",
        "- **onnxruntime** (CPU backend, automatic, falls back to PyTorch): its fused conv kernels run",
        "  the same float32 network about twice as fast as eager PyTorch; probabilities agree to ~1e-6",
        "  (tests check < 1e-3). The graph is exported once per model and cached.",
        "  `onnx` is needed by `torch.onnx.export` to write that graph. Sessions run with the memory",
        "  pattern off and an arena that grows only as needed: a 1024^2 tile peaks at 0.9 GB instead of",
        "  1.3 GB, at the same speed.",
        "- Tiles: images up to 1536^2 run whole (no overlap work); larger ones stream tiles of at most",
        "  1280 pixels band by band, so memory stays bounded, evened out so that none sticks out past",
        "  the image. Tiles overlap by 192 pixels: on a real retina with the shipped model, 128 pixels",
        "  left seams up to 8.9e-3 (and flipped mask pixels), 192 pixels 8.9e-4 (see README, Large",
        "  images). That overlap is why (c) costs more per image pixel than (a): per computed pixel the",
        "  two are close. Reaching 1.15x per image pixel would need 4 x 4 tiles of 2192 pixels, about",
        "  3.2 GB in all, against the 2 GB RSS target; we keep the seams exact and the memory low.",
        "- `r2unet predict` thresholds each finished band of a 2D image at once unless `--probabilities`",
        "  is asked for, so an 8192^2 image never holds 268 MB of float32 probabilities.",
        "- Threads: the CLI uses every core; the napari widget leaves one core to the GUI (e).",
        "- First image (a''): the onnxruntime session (or OpenVINO's marked graph) is built in a background thread while",
        "  the image is read, from the graph onnxruntime optimised for this CPU (cached next to the exported graph, named",
        "  by the CPU's flags);",
        "  the PyTorch network is built only when PyTorch runs; start-up checks use numpy, not scipy (0.4 s to import);",
        "  a checkpoint's tensor shapes are checked against shapes computed from its config, without building the network",
        "  (22 ms); onnxruntime's workers sleep when a run ends instead of spinning on a core that what follows needs.",
        "  The napari widget loads and warms the chosen model up in the background before Segment is pressed.",
        "- Backend rule: onnxruntime for fp32 on every CPU (measured faster than PyTorch with channels_last, eager or",
        "  compiled, on the AVX2 EPYC and the AVX-512 Xeon, and as fast as OpenVINO's fp32 on the Xeon). bf16 on CPUs with",
        "  native bf16 is **OpenVINO** (`openvino`, a dependency on x86-64): the same exported graph with",
        "  `INFERENCE_PRECISION_HINT = bf16` (AMX convolutions), except the first block's 1x1 conv and first recurrent layer",
        "  and the head, kept float32 by OpenVINO's `precise` mark in the graph's IR (cached beside the export; every",
        "  compiled shape is checked to run them in float32). No compiling: a new image shape takes about 0.13 s. Masks as",
        "  fp32's on 99.983 % of the DRIVE test FOV (all-bf16: 99.87 %, fails the 99.9 % rule). `--precision auto` picks",
        "  bf16 on CPUs with native bf16, for cards validated by benchmarks/precision_check.py, where OpenVINO (or the",
        "  compiled PyTorch network, `--backend torch --compile on`) runs it: eager PyTorch bf16 was no faster than",
        "  onnxruntime's fp32. (a), (a''), (c) are the fp32 path; (f) the default bf16 one.",
        "- Training uses PyTorch (autograd) with channels_last tensors (oneDNN's faster NHWC kernels)",
        "  and one batch_norm call per recurrent step (the shared affine fused in): together a step of",
        "  8 x 96^2 went from 0.93 to 0.75 s (two alternating runs of each, 2026-11-25). Batches are",
        "  drawn in the training thread: (d) shows that costs about 1 % of a step, so worker",
        "  processes would only add start-up time and memory.",
        "",
    ]
    verdicts = {"(a)": ratio_a <= TARGETS["a"], "(a'')": ratio_first <= TARGETS["a_first"],
                "(c) per computed pixel": ratio_c / computed <= TARGETS["c"],
                "(c) per image pixel": ratio_c <= TARGETS["c_image"], "(c) RSS": rss < TARGETS["c_rss_gb"], "(d)": ratio_d >= TARGETS["d"],
                **precision_verdicts}
    if not args.no_gui and any(row[0].startswith("(e)") for row in rows):
        verdicts["(e)"] = p95 < TARGETS["e_ms"]
    met = [k for k, ok in verdicts.items() if ok]
    missed = [k for k, ok in verdicts.items() if not ok]
    lines += ["## Targets in this run", "", f"Met: {', '.join(met) or 'none'}. Missed: {', '.join(missed) or 'none'}.", ""]
    target = ROOT / "docs" / "BENCHMARKS.md"
    notes = ""
    if target.is_file() and NOTES in (old_text := target.read_text()):
        notes = old_text[old_text.index(NOTES):]  # hand-written history and analysis: kept across runs
    target.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print("wrote docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
