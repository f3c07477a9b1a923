"""A self-training folder: labelled pairs plus the most confident pseudo-labelled images of an
unlabelled pool, for ``r2unet train --init MODEL`` (how r2unet-skin and unet-skin were made, see
docs/RESULTS.md).

Usage:
    .venv/bin/r2unet predict MODEL POOL_IMAGES --out PRED --save-prob
    .venv/bin/python benchmarks/pseudo_labels.py --pred PRED --pool POOL_IMAGES --images IMAGES --masks MASKS \\
        --out OUT [--keep 420] [--holdout 200]

For each ``PRED/<stem>.tif`` mask and ``PRED/<stem>_prob.tif`` probabilities of a pool image, the
uncertainty is the number of pixels with 0.2 < p < 0.8 per predicted foreground pixel; images
whose foreground is under 1 % or over 95 % are left out (nothing found, or nothing else). The
``--keep`` least uncertain go into ``OUT/images`` (links) and ``OUT/masks`` (their masks, PNG
0/255); every labelled pair is linked beside them. ``OUT/val_ids.txt`` holds the last
``--holdout`` labelled IDs by name, for ``--val-ids``: the checkpoint is chosen on real labels only.
No mask of the pool is read: there is none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BAND = (0.2, 0.8)  # probabilities counted as uncertain
FOREGROUND = (0.01, 0.95)  # predicted foreground fractions kept


def uncertainty(prob: np.ndarray, mask: np.ndarray) -> float:
    """Uncertain pixels (0.2 < p < 0.8) per predicted foreground pixel."""
    doubtful = np.count_nonzero((prob > BAND[0]) & (prob < BAND[1]))
    return doubtful / max(1, np.count_nonzero(mask))


def rank(pred: Path) -> list[tuple[float, str]]:
    """(uncertainty, stem) of the pool's predictions whose foreground is plausible, most confident first."""
    import tifffile

    scores = []
    for prob_path in sorted(pred.glob("*_prob.tif")):
        stem = prob_path.name[: -len("_prob.tif")]
        mask = tifffile.imread(pred / f"{stem}.tif") > 0
        if FOREGROUND[0] <= mask.mean() <= FOREGROUND[1]:
            scores.append((uncertainty(tifffile.imread(prob_path), mask), stem))
    return sorted(scores)


def _link(target: Path, link: Path) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target.resolve())


def build(pred: Path, pool: Path, images: Path, masks: Path, out: Path, keep: int, holdout: int) -> list[str]:
    """Write the folder; returns the chosen pool stems."""
    import tifffile
    from PIL import Image

    from src_models.data import image_stem, list_images, pair_files, sample_id

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new folder (an old run's pool images would be trained on too)")
    scores = rank(pred)
    if not scores:
        raise SystemExit(f"no <stem>_prob.tif in {pred}: run r2unet predict with --save-prob first")
    pool_files = {image_stem(p): p for p in list_images(pool)}
    chosen = [stem for _, stem in scores[:keep]]
    missing = [stem for stem in chosen if stem not in pool_files]
    if missing:
        raise SystemExit(f"{missing[0]} was predicted but is not in {pool}: give the folder that was predicted")
    pairs = [p for p in pair_files(images, masks) if p.mask is not None]
    if not pairs:
        raise SystemExit(f"no image of {images} has a mask in {masks}")
    clash = sorted({sample_id(pool_files[stem]) for stem in chosen} & {p.id for p in pairs})
    if clash:
        raise SystemExit(f"pool images share IDs with the labelled ones ({clash[0]}, ...): use distinct names")
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for p in pairs:
        _link(p.image, out / "images" / p.image.name)
        _link(p.mask, out / "masks" / p.mask.name)
    for stem in chosen:
        _link(pool_files[stem], out / "images" / pool_files[stem].name)
        mask = tifffile.imread(pred / f"{stem}.tif") > 0
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
    held = [p.id for p in pairs][-holdout:] if holdout > 0 else []
    (out / "val_ids.txt").write_text(",".join(held))
    paired = pairs
    worst = scores[len(chosen) - 1][0] if chosen else float("nan")
    print(f"{len(paired)} labelled pairs, {len(scores)} plausible pool images, kept {len(chosen)} "
          f"(uncertainty <= {worst:.4f}); holdout {len(held)} labelled IDs in {out / 'val_ids.txt'}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", type=Path, required=True, help="r2unet predict --save-prob output of the pool")
    parser.add_argument("--pool", type=Path, required=True, help="the unlabelled images predicted")
    parser.add_argument("--images", type=Path, required=True, help="labelled images")
    parser.add_argument("--masks", type=Path, required=True, help="their masks (same stems)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", type=int, default=420, help="pool images kept, most confident first")
    parser.add_argument("--holdout", type=int, default=200, help="labelled IDs (last by name) for --val-ids")
    args = parser.parse_args(argv)
    build(args.pred, args.pool, args.images, args.masks, args.out, args.keep, args.holdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
