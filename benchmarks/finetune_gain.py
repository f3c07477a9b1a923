"""How many seconds of fine-tuning on 2 corrected images make r2unet-drive good on a new kind of image?

The human-in-the-loop scenario of the Fine-tune widget, headless (the widget and this script
run the same engine: ``src_models.finetune.build_trainer`` -> ``Trainer``): the base model segments 2
images of a kind it was not trained on, a user corrects them (here: the corrected labels are
the ground truth, and the corrected pixels are where the base prediction differs from it), then
the model is fine-tuned with the widget's defaults. After every epoch (25 steps) the current
weights are scored on held-out images of the same kind; the clock counts training time only.

Kinds:
- ``synthetic``: RGB synthetic vessel images (src_models.synthetic, 512 x 512), train seeds 200-201,
  test seeds 100-107. Needs nothing but this repository.
- ``angiography``: DRIVE images with inverted intensities inside the field of view (vessels
  bright on dark, like a fluorescein angiogram); train on DRIVE training images 21 and 22, test on
  the 20 DRIVE test images (first observer). Needs ../shared/datasets/DRIVE.
- ``camera``: DRIVE images as another camera takes them: x1.7 (about 990 px, vessels 1.7x wider)
  and colour-shifted (benchmarks/robustness.py); same images as ``angiography``.

    python benchmarks/finetune_gain.py --kind synthetic --epochs 12
    python benchmarks/finetune_gain.py --kind angiography --epochs 12
    python benchmarks/finetune_gain.py --kind camera --minutes 4 --precision bf16   # the same budget in bf16

Prints one line per epoch (and after steps 2, 5 and 10): training seconds, F1 and AUC on the
held-out images; then the saved version (with ``--validation holdout``, the default as in the
widget, the epoch that scored best on the held-out blocks, the base model being the one to beat)
scored on all the held-out images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DRIVE = ROOT.parent / "shared" / "datasets" / "DRIVE"


def synthetic(seeds: list[int]) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    from src_models.synthetic import vessel_image

    return [(f"syn{s}", *vessel_image((512, 512), n_vessels=14, seed=s, rgb=True), None) for s in seeds]


def drive_images(split: str, ids: list[int]) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """DRIVE ``split`` images ``ids`` as (id, RGB image, 1st_manual truth, FOV mask)."""
    from src_models.data import binarize_mask, read_image, read_mask

    folder = DRIVE / split
    return [(f"{i:02d}", read_image(next((folder / "images").glob(f"{i:02d}_*"))),
             binarize_mask(read_image(next((folder / "1st_manual").glob(f"{i:02d}_*")))),
             read_mask(next((folder / "mask").glob(f"{i:02d}_*")))) for i in ids]


def angiography(split: str, ids: list[int]) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    return [(name, np.where(fov[..., None], 255 - image, 0).astype(np.uint8), truth, fov)
            for name, image, truth, fov in drive_images(split, ids)]


def camera(split: str, ids: list[int], factor: float = 1.7) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """DRIVE images as another camera would take them: rescaled by ``factor`` (vessels that much
    wider, like the 999x960 sets) and colour-shifted (benchmarks/robustness.py's transforms)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from robustness import colour_shift, rescale_image, rescale_mask

    return [(name, colour_shift(rescale_image(image, factor)), rescale_mask(truth.astype(np.uint8), factor) > 0,
             rescale_mask(fov.astype(np.uint8), factor) > 0) for name, image, truth, fov in drive_images(split, ids)]


def score(model, checkpoint, images) -> dict[str, float]:
    import torch

    from src_models.inference import Segmenter
    from src_models.metrics import MetricAccumulator

    segmenter = Segmenter(checkpoint, device="cpu", backend="torch")  # torch: it runs the weights being trained
    segmenter.model = model
    model.eval()
    acc = MetricAccumulator()
    with torch.inference_mode():
        for _, image, truth, fov in images:
            acc.add(segmenter.predict(image)[0], truth > 0, fov)
    return acc.pooled()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r2unet-drive", help="the base model: a pretrained name or a checkpoint (default: r2unet-drive)")
    parser.add_argument("--kind", choices=["synthetic", "angiography", "camera"], default="synthetic")
    parser.add_argument("--minutes", type=float, default=None, help="a time budget (with --epochs: whichever ends first)")
    parser.add_argument("--l2sp", type=float, default=None, help="L2-SP strength (default: the fine-tuning default)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the fine-tuning default)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 12 without --minutes)")
    parser.add_argument("--validation", choices=["holdout", "none"], default="holdout",
                        help="holdout (the widget's default: 20%% of each image, in blocks, picks the best epoch, the base "
                             "model the one to beat) or none (the last epoch is the version)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads (default: cores - 1, what the napari widget uses)")
    parser.add_argument("--early-steps", type=lambda t: {int(v) for v in t.split(",") if v}, default={2, 5, 10},
                        help="also score after these steps of the first epoch (default: 2,5,10)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="training arithmetic (bf16: autocast, for CPUs with AMX or AVX-512 BF16; default fp32, the widget's)")
    parser.add_argument("--curve-images", type=int, default=5, help="held-out images scored after each epoch (all at the end)")
    args = parser.parse_args()

    import torch

    from src_models.finetune import FinetuneRequest, PairData, build_trainer
    from src_models.model_names import load_model
    from src_models.settings import DEFAULT_THRESHOLD
    from src_models.training import EventKind

    torch.set_num_threads(args.threads)
    if args.kind in ("angiography", "camera") and not DRIVE.is_dir():
        print(f"DRIVE not found at {DRIVE}: run with --kind synthetic")
        return 1
    kinds = {"synthetic": (lambda: synthetic([200, 201]), lambda: synthetic(list(range(100, 108)))),
             "angiography": (lambda: angiography("training", [21, 22]), lambda: angiography("test", list(range(1, 21)))),
             "camera": (lambda: camera("training", [21, 22]), lambda: camera("test", list(range(1, 21))))}
    train, test = (make() for make in kinds[args.kind])
    curve = test[: args.curve_images]

    base = load_model(args.model)
    from src_models.inference import Segmenter

    segmenter = Segmenter(base, device="cpu")
    pairs = []
    for name, image, truth, fov in train:
        predicted = segmenter.predict(image)[0] >= DEFAULT_THRESHOLD
        changed = predicted != (truth > 0)
        if fov is not None:
            changed &= fov
        pairs.append(PairData(name, image, -1, truth.astype(np.uint8), changed))
        print(f"corrected {name}: {int(changed.sum()):,} pixels changed by the user")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        request = FinetuneRequest(base=base, pairs=pairs, out=Path(tmp) / "v.safetensors", name="bench",
                                  epochs=args.epochs or (None if args.minutes else 12), minutes=args.minutes, validation=args.validation, device="cpu",
                                  settings={"l2sp": args.l2sp, "lr": args.lr, "precision": args.precision})
        trainer = build_trainer(request)
        before = score(trainer.model, base, test)
        print(f"kind {args.kind}, {args.threads} thread(s), {trainer.precision}, {len(test)} held-out images, budget {trainer.budget()}")
        print(f"{'train s':>8} {'epoch':>5} {'F1':>7} {'AUC':>7}   (first {len(curve)} held-out images)")
        start = score(trainer.model, base, curve)
        print(f"{0.0:8.1f} {0:5d} {start['F1']:7.4f} {start['AUC']:7.4f}")
        run, train_s = trainer.run(), 0.0
        while True:
            start = time.perf_counter()
            event = next(run, None)
            train_s += time.perf_counter() - start
            if event is None:
                break
            if event.kind.is_final:
                print(f"run: {event.message}")
            early = event.kind == EventKind.STEP and event.step in args.early_steps
            if event.kind == EventKind.EPOCH or early:
                metrics = score(trainer.model, base, curve)
                trainer._train_mode()  # scoring switched the model to evaluation mode
                where = f"{event.step / trainer.steps_per_epoch:5.2f}" if early else f"{event.epoch:5d}"
                print(f"{train_s:8.1f} {where} {metrics['F1']:7.4f} {metrics['AUC']:7.4f}", flush=True)
        from src_models.checkpoint import load_checkpoint

        version = load_checkpoint(request.out)  # what the user gets: the best epoch (or the base weights)
        after = score(version.build(), version, test)
    print(f"all {len(test)} held-out images: F1 {before['F1']:.4f} -> {after['F1']:.4f}, AUC {before['AUC']:.4f} -> {after['AUC']:.4f} "
          f"after {train_s:.0f} s of fine-tuning (the saved version: epoch {version.provenance.get('best_epoch')}, validation {args.validation})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
