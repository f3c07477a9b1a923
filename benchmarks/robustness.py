"""Robustness of a vessel model to what another clinic's fundus camera changes: the DRIVE test set
rescaled, colour-shifted, gamma-corrected and JPEG-compressed, each scored by ``r2unet evaluate``.

Usage:
    .venv/bin/python benchmarks/robustness.py MODEL [--transforms x1.7,jpeg70] [--threads 1]
        [--drive ../shared/datasets/DRIVE] [--json OUT] [--write] [-- EVALUATE OPTIONS, e.g. --tta]

Each transformed copy of the 20 test images (with their ``1st_manual`` and FOV masks, which a
rescale resamples by nearest neighbour) is written to a temporary folder outside the repository
and scored by the real CLI, ``r2unet evaluate MODEL --images --masks --fov --json --device cpu``
plus the options after ``--``: pooled F1, AUC, SE and SP inside the FOV at the model card's
threshold (the DRIVE protocol), at the transformed resolution. ``native`` (the files as they are)
is always run first: it is the reference of the target |F1 - native F1| <= :data:`TARGET`.
``--write`` puts one table per model and options into the section :data:`ROBUSTNESS_HEADING` of
docs/RESULTS.md; a rerun replaces that table only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from results_io import RESULTS, ROBUSTNESS_HEADING, ROOT, cli_evaluate, cpu_description, section_body, write_section

TARGET = 0.02  # largest |F1 - native F1| a transform may cost
# "another camera": a sensor whose colour channels cross-talk (each row sums to 1), a cooler white
# balance (gains) and a black-level / flare offset, in 0-255 units: out = clip(GAINS * (MIX @ rgb) + OFFSET)
COLOUR_MIX = np.array([[0.90, 0.10, 0.00], [0.12, 0.80, 0.08], [0.00, 0.15, 0.85]])
COLOUR_GAINS = np.array([0.85, 1.05, 1.20])
COLOUR_OFFSET = np.array([12.0, 6.0, 0.0])
JPEG_SUBSAMPLING = 2  # Pillow's code for 4:2:0 chroma subsampling, what cameras and most encoders write


def scaled_size(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    """``(H, W)`` of an image of ``shape`` ``(H, W[, C])`` rescaled by ``factor`` (rounded half up)."""
    return max(1, int(shape[0] * factor + 0.5)), max(1, int(shape[1] * factor + 0.5))


def rescale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 ``(H, W[, C])`` -> uint8 ``(H', W'[, C])`` of :func:`scaled_size`, bilinear; Pillow widens
    the filter by the factor when it shrinks, so a downscale is antialiased."""
    from PIL import Image

    height, width = scaled_size(image.shape, factor)
    return np.asarray(Image.fromarray(_uint8(image)).resize((width, height), Image.Resampling.BILINEAR))


def rescale_mask(mask: np.ndarray, factor: float) -> np.ndarray:
    """Binary ``(H, W)`` -> bool ``(H', W')`` of :func:`scaled_size`, nearest neighbour (stays binary)."""
    from PIL import Image

    height, width = scaled_size(mask.shape, factor)
    grey = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))
    return np.asarray(grey.resize((width, height), Image.Resampling.NEAREST)) > 127


def colour_shift(image: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` -> the same as another camera would record it (:data:`COLOUR_MIX`,
    :data:`COLOUR_GAINS`, :data:`COLOUR_OFFSET`), uint8 ``(H, W, 3)``."""
    rgb = _uint8(image)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"colour_shift needs an RGB image (H, W, 3), not {rgb.shape}")
    shifted = (rgb.astype(np.float64) @ COLOUR_MIX.T) * COLOUR_GAINS + COLOUR_OFFSET
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)


def gamma_correct(image: np.ndarray, gamma: float) -> np.ndarray:
    """uint8 ``(H, W[, C])`` -> uint8 ``255 * (image / 255) ** gamma`` (< 1 brightens, > 1 darkens)."""
    table = np.rint(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return table[_uint8(image)]


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """uint8 ``(H, W[, 3])`` -> the same image saved as JPEG at ``quality`` (4:2:0) and decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_uint8(image)).save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded)


def _uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"the transforms work on 8-bit images, not {image.dtype}")
    return image


@dataclass(frozen=True)
class Transform:
    """One way to change the test set: ``image`` maps uint8 ``(H, W, 3)`` to uint8 ``(H', W', 3)``;
    a ``factor`` other than 1 rescales the masks to match (nearest)."""

    name: str
    description: str
    image: Callable[[np.ndarray], np.ndarray] | None  # None: the files as they are
    factor: float = 1.0


TRANSFORMS = {t.name: t for t in (
    Transform("native", "the test files as they are (the reference)", None),
    Transform("x0.7", "rescaled by 0.7 (bilinear, antialiased; masks and FOV nearest)", lambda im: rescale_image(im, 0.7), 0.7),
    Transform("x1.7", "rescaled by 1.7 (bilinear; masks and FOV nearest): about 990 px tall", lambda im: rescale_image(im, 1.7), 1.7),
    Transform("colour", f"another camera: out = clip(gains * (M @ rgb) + offset) with channel cross-talk M = "
              f"{COLOUR_MIX.tolist()}, white-balance gains {COLOUR_GAINS.tolist()} (R, G, B), offset "
              f"{COLOUR_OFFSET.tolist()} grey levels", colour_shift),
    Transform("gamma0.6", "gamma 0.6: 255 * (x / 255) ** 0.6 (brighter mid-tones)", lambda im: gamma_correct(im, 0.6)),
    Transform("gamma1.6", "gamma 1.6: 255 * (x / 255) ** 1.6 (darker mid-tones)", lambda im: gamma_correct(im, 1.6)),
    Transform("jpeg70", "JPEG at quality 70, 4:2:0 chroma subsampling (Pillow/libjpeg), decoded again", lambda im: jpeg_round_trip(im, 70)),
)}


def build_set(transform: Transform, drive: Path, work: Path) -> tuple[Path, Path, Path, tuple[int, int]]:
    """The DRIVE test set transformed into ``work`` (PNG, lossless): its images, masks and FOV
    folders (the original ones where the transform leaves them unchanged) and the image size (H, W)."""
    from PIL import Image

    from src_models.data import pair_files, read_image, read_mask

    test = drive / "test"
    folders = test / "images", test / "1st_manual", test / "mask"
    samples = pair_files(*folders)
    if transform.image is None:
        return (*folders, read_image(samples[0].image).shape[:2])
    images = work / "images"
    masks, fov = (work / "1st_manual", work / "mask") if transform.factor != 1 else folders[1:]
    for folder in {images, masks, fov} - set(folders):
        folder.mkdir(parents=True)
    for s in samples:
        image = transform.image(read_image(s.image))
        Image.fromarray(image).save(images / f"{s.image.stem}.png")
        if transform.factor != 1:
            for source, target in ((s.mask, masks), (s.fov, fov)):
                grey = np.where(rescale_mask(read_mask(source), transform.factor), 255, 0).astype(np.uint8)
                Image.fromarray(grey).save(target / f"{source.stem}.png")
    return images, masks, fov, image.shape[:2]


def measure(model: str, names: Sequence[str], drive: Path, options: Sequence[str], env: dict[str, str]) -> list[dict]:
    """Evaluate ``model`` on each transformed set (``native`` first): one row per transform with
    its pooled F1, AUC, SE, SP, the F1 difference to native, the verdict and the seconds per image."""
    rows: list[dict] = []
    for name in ["native", *[n for n in names if n != "native"]]:
        with tempfile.TemporaryDirectory(prefix=f"r2unet-robustness-{name}-") as work:
            images, masks, fov, size = build_set(TRANSFORMS[name], drive, Path(work))
            result, seconds = cli_evaluate(model, images, masks, fov, ["--device", "cpu", *options], env)
        pooled = result["pooled"]
        delta = pooled["F1"] - (rows[0]["F1"] if rows else pooled["F1"])
        rows.append({"transform": name, "height": size[0], "width": size[1], "threshold": result["threshold"],
                     **{k: pooled[k] for k in ("F1", "AUC", "SE", "SP")}, "dF1": delta,
                     "within": abs(delta) <= TARGET, "seconds_per_image": seconds})
        print(f"{name:<9} {size[1]}x{size[0]}  F1 {pooled['F1']:.4f}  AUC {pooled['AUC']:.4f}  SE {pooled['SE']:.4f}  "
              f"SP {pooled['SP']:.4f}  dF1 {delta:+.4f} {'ok' if abs(delta) <= TARGET else 'OUTSIDE the target'}  "
              f"({seconds:.2f} s/image)", flush=True)
    return rows


def run_heading(model: str, options: Sequence[str]) -> str:
    """The heading of one model run's table: the model and the options passed to evaluate."""
    return f"### `{model}`" + (f", `{shlex.join(options)}`" if options else "")


def table(rows: Sequence[dict]) -> list[str]:
    """The markdown table of :func:`measure`'s rows."""
    lines = [f"| transform | size (W x H) | F1 | AUC | SE | SP | F1 - native | within {TARGET:g} | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "(reference)" if r["transform"] == "native" else f"{r['dF1']:+.4f}"
        verdict = "-" if r["transform"] == "native" else "yes" if r["within"] else "**NO**"
        lines.append(f"| {r['transform']} | {r['width']} x {r['height']} | " + " | ".join(f"{r[k]:.4f}" for k in ("F1", "AUC", "SE", "SP"))
                     + f" | {delta} | {verdict} | {r['seconds_per_image']:.2f} |")
    return lines


def run_block(model: str, options: Sequence[str], rows: Sequence[dict], about: dict) -> list[str]:
    """One model run: heading, how it was measured, the table and the verdict."""
    others = [r for r in rows if r["transform"] != "native"]
    outside = [f"{r['transform']} ({r['dF1']:+.4f})" for r in others if not r["within"]]
    return [run_heading(model, options), "",
            f"Reproduce with `.venv/bin/python {about['command']}`. Measured {about['date']} on {about['cpu']}, "
            f"{about['threads']}; threshold {rows[0]['threshold']:g} (the model card's unless the options set one); "
            f"wall time {about['wall_s'] / 60:.1f} min for the whole run (s/image: the whole `r2unet evaluate` command, "
            "start-up included, divided by 20).", "", *table(rows), "",
            f"Within the target: {len(others) - len(outside)} of {len(others)} transforms"
            + (f"; outside: {', '.join(outside)}." if outside else "."), ""]


def intro() -> list[str]:
    """The section's text before the tables: the protocol and the transforms."""
    return ["Each row is `r2unet evaluate MODEL --images --masks --fov --json --device cpu` (plus the options in",
            "the table's heading) on the 20 DRIVE test images transformed as below, written to a temporary folder",
            "outside the repository by `benchmarks/robustness.py`: pooled F1, AUC, SE and SP against `1st_manual`",
            "inside the FOV masks, at the model card's threshold, computed at the transformed resolution. Target:",
            f"|F1 - native F1| <= {TARGET:g}. One table per model and options; a rerun replaces its own table only.",
            "Without options `evaluate` runs with its defaults, `--scale auto` among them (a vessel model resizes an",
            "image whose field of view differs by more than 10 % from its training images' to their scale);",
            "`-- --scale 1` shows the same model at native resolution.",
            "", *[f"- `{t.name}`: {t.description}." for t in TRANSFORMS.values()], ""]


def merge_run(body: str | None, heading: str, block: Sequence[str]) -> list[str]:
    """The section's lines: :func:`intro`, then the tables of ``body`` (the section as it was) with
    the one headed ``heading`` replaced by ``block`` (appended when new)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (body or "").splitlines():
        if line.startswith("### "):
            current = blocks.setdefault(line, [])
        if current is not None:
            current.append(line)
    blocks[heading] = list(block)
    lines = intro()
    for run in blocks.values():
        while run and not run[-1].strip():
            run = run[:-1]
        lines += [*run, ""]
    return lines


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, options = (argv[:argv.index("--")], list(argv[argv.index("--") + 1:])) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Options after -- go to r2unet evaluate.")
    parser.add_argument("model", metavar="MODEL", help="pretrained name or checkpoint path of a vessel model")
    parser.add_argument("--drive", type=Path, default=ROOT.parent / "shared" / "datasets" / "DRIVE", help="the DRIVE folder (with test/)")
    parser.add_argument("--transforms", default=",".join(TRANSFORMS), help=f"comma-separated subset of {', '.join(TRANSFORMS)} (native always runs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each evaluate (sets OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the rows and the run's details as JSON")
    parser.add_argument("--write", action="store_true", help=f"write this run's table into '{ROBUSTNESS_HEADING}' of docs/RESULTS.md")
    args = parser.parse_args(own)
    args.names = [n.strip() for n in args.transforms.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in TRANSFORMS]
    if unknown or not args.names:
        parser.error(f"unknown transform(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TRANSFORMS)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be >= 1")
    return args, options


def reproduce_command(argv: Sequence[str]) -> str:
    """The command line of this run without ``--json OUT`` (where a copy went is no part of the result)."""
    own = list(argv[:argv.index("--")] if "--" in argv else argv)
    kept, skip = [], False
    for arg in own:
        if not skip and arg != "--json" and not arg.startswith("--json="):
            kept.append(arg)
        skip = arg == "--json" and not skip
    return shlex.join(["benchmarks/robustness.py", *kept, *argv[len(own):]])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, options = _parse(argv)
    if not (args.drive / "test" / "images").is_dir():
        print(f"DRIVE not found at {args.drive} (no test/images): robustness benchmark skipped; pass --drive DIR")
        return 0
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # evaluate runs from the repo root
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    cpu = cpu_description()
    print(f"CPU: {cpu}", flush=True)
    start = time.perf_counter()
    rows = measure(model, args.names, args.drive, options, env)
    wall = time.perf_counter() - start
    about = {"command": reproduce_command(argv), "cpu": cpu, "wall_s": wall,
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "model": args.model, "options": options,
             "threads": f"OMP_NUM_THREADS={args.threads} for each evaluate" if args.threads else "torch's default threads"}
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min) on {cpu}")
    if args.json:
        from src_models.fileio import atomic_write

        text = json.dumps({**about, "target": TARGET, "rows": rows}, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text), suffix=".json")
    if args.write:
        body = section_body(RESULTS.read_text(), ROBUSTNESS_HEADING) if RESULTS.exists() else None
        write_section(ROBUSTNESS_HEADING, merge_run(body, run_heading(args.model, options), run_block(args.model, options, rows, about)))
        print(f"wrote the table of {run_heading(args.model, options)[4:]} into '{ROBUSTNESS_HEADING}' of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
