"""One short GPU run (under 5 minutes): does our code do on a CUDA device what it promises?

    .venv/bin/python benchmarks/gpu_check.py [--model r2unet-drive] [--device cuda] [--smoke]

Prints, each on a line of its own (``--device cpu --smoke``: a dry run of the script itself, as CI runs it):

1. the largest probability difference between the device (float32, no AMP) and the CPU, and how
   many mask pixels differ, on a fundus-sized synthetic image (made here);
2. AMP agreement: float16 and bfloat16 autocast against float32 on the device (largest
   probability difference, mask agreement), and what ``Segmenter`` picks by default;
3. batched-tile throughput: a batch of tiles through the network in float32 and under AMP, in
   FLOP/s and as a fraction of the device's matmul roofline measured now (a large ``torch.mm``
   in the same precision);
4. fine-tune step speed: seconds per step of 8 x 256^2 patches (the Trainer, float32);
5. device memory after a fine-tune run in this process (``src_models.finetune.finetune``, what
   the widget's worker runs): allocated and reserved before, right after and after the worker's
   own release; memory held until the process exits is what micro-sam#952 reports.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeat: int, sync) -> float:
    """Best wall time of ``fn()`` over ``repeat`` runs (after one warm-up), the device synchronised."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_roofline(device, dtype, n: int, sync) -> float:
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: torch.mm(a, b), 5, sync)


def agreement(reference: np.ndarray, other: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """(largest |p - p_ref|, fraction of mask pixels that agree)."""
    return float(np.abs(other - reference).max()), float(((other >= threshold) == (reference >= threshold)).mean())


def check_predictions(checkpoint, image: np.ndarray, device: str) -> None:
    from src_models.inference import Segmenter

    cpu = Segmenter(checkpoint, device="cpu", backend="torch").predict(image, channel_axis=-1)
    exact = Segmenter(checkpoint, device=device, amp=False, backend="torch")
    fp32 = exact.predict(image, channel_axis=-1)
    diff, agree = agreement(cpu, fp32)
    print(f"1. {device} float32 vs CPU: max |dp| {diff:.2e}, masks agree on {agree:.5%} of pixels "
          f"({int(round((1 - agree) * fp32[0].size))} differ)", flush=True)
    auto = Segmenter(checkpoint, device=device, backend="torch")
    amp = auto.predict(image, channel_axis=-1)
    diff, agree = agreement(fp32, amp)
    picked = {"amp": "AMP (bfloat16 if supported, else float16)", "bf16": "bf16 autocast",
              "fp32": "float32"}[auto.precision]
    print(f"2. Segmenter default on {device}, {picked}: max |dp| {diff:.2e} vs float32, masks agree on {agree:.5%}", flush=True)


def check_autocast(checkpoint, device, side: int, batch: int, sync) -> None:
    import torch

    from src_models.nets import flops_per_megapixel, logits_to_probabilities

    model = checkpoint.build(device).eval()
    x = torch.randn(batch, checkpoint.config.in_channels, side, side, device=device)
    flops = flops_per_megapixel(checkpoint.config) * batch * side * side / 1e6

    def run(dtype):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return logits_to_probabilities(model(x).float())

    reference = run(None).cpu().numpy()
    precisions = [("float32", None, torch.float32)]
    if device.type == "cuda":
        precisions += [("float16", torch.float16, torch.float16)]
        if torch.cuda.is_bf16_supported():
            precisions += [("bfloat16", torch.bfloat16, torch.bfloat16)]
    else:
        precisions += [("bfloat16", torch.bfloat16, torch.bfloat16)]
    for name, dtype, mm_dtype in precisions:
        if dtype is not None:
            diff, agree = agreement(reference, run(dtype).cpu().numpy())
            print(f"2. autocast {name} vs float32 ({batch} x {side}^2 random tiles): max |dp| {diff:.2e}, masks agree on {agree:.4%}", flush=True)
        seconds = timed(lambda dtype=dtype: run(dtype), 3, sync)
        roofline = matmul_roofline(device, mm_dtype, 4096 if device.type == "cuda" else 1024, sync)
        print(f"3. {name}: {batch} x {side}^2 tiles in {seconds * 1e3:.1f} ms, {flops / seconds / 1e12:.2f} TFLOP/s = "
              f"{flops / seconds / roofline:.0%} of the {name} matmul roofline ({roofline / 1e12:.1f} TFLOP/s)", flush=True)


def check_training(checkpoint, device: str, steps: int, patch: int) -> None:
    from src_models.synthetic import vessel_image
    from src_models.training import EventKind, TrainConfig, Trainer, make_sample

    image, mask = vessel_image((max(256, patch), max(256, patch)), n_vessels=10, seed=2, rgb=True)
    samples = [make_sample(f"s{i}", image, mask, checkpoint.preprocess, channel_axis=-1) for i in range(2)]
    config = TrainConfig(batch_size=8, patch_size=patch, epochs=1, steps_per_epoch=steps, val_fraction=0.0, warmup_steps=1)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(None, None, samples, config, Path(work) / "t.safetensors", base=checkpoint, device=device)
        stamps = [time.perf_counter()] + [time.perf_counter() for e in trainer.run() if e.kind == EventKind.STEP]
    step = float(np.median(np.diff(stamps[2:]))) if len(stamps) > 3 else float(np.diff(stamps).mean())
    print(f"4. fine-tune step on {device}: {step:.3f} s per step of 8 x {patch}^2 (float32)", flush=True)


def check_memory(checkpoint_name: str, device: str, steps: int) -> None:
    import torch

    from src_models.finetune import FinetuneRequest, PairData, finetune
    from src_models.synthetic import vessel_image

    if not device.startswith("cuda"):
        print("5. device memory after a fine-tune: n/a (not a CUDA device)", flush=True)
        return

    def mb() -> str:
        return f"allocated {torch.cuda.memory_allocated() / 2**20:.0f} MB, reserved {torch.cuda.memory_reserved() / 2**20:.0f} MB"

    before = mb()
    image, mask = vessel_image((256, 256), seed=3, rgb=True)
    with tempfile.TemporaryDirectory() as work:
        request = FinetuneRequest(base=checkpoint_name, pairs=[PairData("a", image, -1, mask, None)], out=Path(work) / "v.safetensors",
                                  name="gpu check", epochs=1, device=device, settings={"steps_per_epoch": steps, "patch_size": 128})
        finetune(request, lambda event: None, lambda: False)
    gc.collect()
    print(f"5. device memory: before {before}; after the fine-tune worker returned {mb()} (target: allocated back to before, "
          "reserved released)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r2unet-drive")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a dry run of the script)")
    args = parser.parse_args(argv)
    import torch

    from src_models.model_names import load_model
    from src_models.synthetic import vessel_image

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine (or --device cpu --smoke for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    checkpoint = load_model(args.model)
    shape = (96, 96) if args.smoke else (584, 565)
    image = vessel_image(shape, n_vessels=14, seed=0, rgb=True)[0]
    start = time.perf_counter()
    check_predictions(checkpoint, image, args.device)
    check_autocast(checkpoint, device, 64 if args.smoke else 512, 2 if args.smoke else 8, sync)
    check_training(checkpoint, args.device, 3 if args.smoke else 20, 64 if args.smoke else 256)
    check_memory(args.model, args.device, 2 if args.smoke else 10)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
