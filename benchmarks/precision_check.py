"""Does a model keep its masks in bfloat16? The check behind a card's ``bf16`` flag.

    .venv/bin/python benchmarks/precision_check.py r2unet-drive --images ../shared/datasets/DRIVE/test/images \
        --masks ../shared/datasets/DRIVE/test/1st_manual --fov ../shared/datasets/DRIVE/test/mask [--install]

Each image is segmented twice, by PyTorch in float32 and in bf16 as ``--precision auto`` runs it,
with the card's threshold: by OpenVINO where it is installed and the CPU has native bf16 (float32
ends, :mod:`src_models.openvino_backend`), else by PyTorch with bf16 autocast (channels_last),
compiled (batch norms folded, ``torch.compile``) unless ``--compile off`` or no compiler is at
hand; ``--backend torch`` checks the PyTorch path where OpenVINO would run. The masks must
agree on >= 99.9 % of the pixels (inside the FOV where given) and the pooled F1 against the
ground truth must move by <= 0.002. ``--install`` then sets ``bf16`` in the card of the model's
file in ``src_models/weights/`` (weights untouched), so ``--precision auto`` uses bf16 on CPUs
with native bf16. Where the CPU has none, bf16 is
emulated: the numbers are the same arithmetic (bf16 products, float32 sums), only slower.
Without ``--images`` it runs on synthetic fundus images (a smoke check, never installs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AGREEMENT, F1_DRIFT = 0.999, 0.002  # the validation rule for bf16


def samples(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    from src_models.data import pair_files, read_image, read_mask

    if args.images is None:
        from src_models.synthetic import vessel_image

        return [(f"synthetic-{i}", *vessel_image((192, 176), seed=i, rgb=True), None) for i in range(2)]
    pairs = pair_files(args.images, args.masks, args.fov)[: args.limit]
    return [(p.id, read_image(p.image), read_mask(p.mask) > 0, read_mask(p.fov) > 0 if p.fov else None) for p in pairs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--masks", type=Path)
    parser.add_argument("--fov", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", choices=("on", "off"), default=None,
                        help="compile the bf16 network (default: on where inductor can build, as --precision auto runs it)")
    parser.add_argument("--backend", choices=("auto", "openvino", "torch"), default="auto",
                        help="the bf16 engine checked (auto: what --precision auto runs, OpenVINO where installed and the CPU has native bf16)")
    parser.add_argument("--install", action="store_true", help="set bf16 in the card of src_models/weights/MODEL.safetensors when it passes")
    args = parser.parse_args()

    import torch

    from src_models.compiled import compiler_available
    from src_models.inference import Segmenter
    from src_models.metrics import MetricAccumulator
    from src_models.model_names import load_model
    from src_models.precision import cpu_has_native_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_model(args.model)
    threshold = checkpoint.model_card.threshold
    fp32 = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32")
    from src_models.openvino_backend import openvino_available

    openvino = args.backend == "openvino" or (args.backend == "auto" and openvino_available() and cpu_has_native_bf16())
    compile = not openvino and (args.compile == "on" if args.compile else compiler_available())
    bf16 = Segmenter(checkpoint, "cpu", backend="openvino" if openvino else "torch", precision="bf16", compile=compile)
    pooled = {"fp32": MetricAccumulator(threshold=threshold), "bf16": MetricAccumulator(threshold=threshold)}
    same = total = 0
    seconds = {"fp32": 0.0, "bf16": 0.0}
    max_diff = 0.0
    for name, image, truth, fov in samples(args):
        probs = {}
        for label, segmenter in (("fp32", fp32), ("bf16", bf16)):
            start = time.perf_counter()
            probs[label] = segmenter.predict(image)[0]
            seconds[label] += time.perf_counter() - start
            if truth is not None:
                pooled[label].add(probs[label], truth, fov)
        inside = fov if fov is not None else np.ones(probs["fp32"].shape, bool)
        agree = ((probs["fp32"] >= threshold) == (probs["bf16"] >= threshold))[inside]
        same, total = same + int(agree.sum()), total + agree.size
        max_diff = max(max_diff, float(np.abs(probs["fp32"] - probs["bf16"]).max()))
        print(f"{name}: masks agree on {agree.mean():.4%} of {agree.size:,} pixels", flush=True)
    agreement = same / total
    f1 = {k: acc.pooled()["F1"] for k, acc in pooled.items()} if args.images is not None else {}
    drift = abs(f1["bf16"] - f1["fp32"]) if f1 else 0.0
    native = "native" if cpu_has_native_bf16() else "emulated (no AMX / AVX-512 BF16 here)"
    print(f"{args.model}: masks agree on {agreement:.4%} of {total:,} pixels (>= {AGREEMENT:.1%}); max probability difference {max_diff:.3g}; "
          + (f"pooled F1 fp32 {f1['fp32']:.4f}, bf16 {f1['bf16']:.4f} (|diff| {drift:.4f} <= {F1_DRIFT}); " if f1 else "")
          + f"bf16 {native}, {bf16.backend}: {seconds['bf16']:.1f} s vs fp32 {seconds['fp32']:.1f} s")
    passed = agreement >= AGREEMENT and drift <= F1_DRIFT and bool(f1)
    print("PASS" if passed else "FAIL" if f1 else "(smoke: no ground truth, nothing decided)")
    if args.install and passed:
        from src_models.checkpoint import load_checkpoint, save_checkpoint

        target = ROOT / "src_models" / "weights" / f"{args.model}.safetensors"
        ck = load_checkpoint(target)
        save_checkpoint(target, ck.state_dict, ck.config, ck.preprocess, ck.class_names, ck.provenance,
                        card=ck.model_card.with_(bf16=True))
        print(f"installed: {target} card bf16 = true")
    return 0 if passed or not f1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
