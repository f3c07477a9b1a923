"""What a clinician's corrections are worth: a simulated human in the loop over a folder of images.

Usage:
    .venv/bin/python benchmarks/hitl_simulation.py MODEL --images DIR --masks DIR [--fov DIR]
        [--order uncertainty|sequential|random] [--finetune-every K] [--minutes M] [--steps N]
        [--transform NAME] [--limit L] [--json OUT] [--plot PNG] [--write] [--threads T] [--seed S]
    .venv/bin/python benchmarks/hitl_simulation.py --write-from OUT.json [--plot PNG]   (the --write table of a saved run)

It runs the Annotate folder widget's own code (:class:`src_models.annotation.FolderSession`,
:mod:`src_models.annotation_run`) on a copy of the folder outside the repository:

1. open the folder (the images, transformed by ``--transform`` from benchmarks/robustness.py,
   e.g. ``x1.7`` or ``colour``, to look like another camera) and predict every image with MODEL;
2. take the next image in the chosen order (``uncertainty``: most uncertain first, as Next does);
3. count the pixels a person would fix: its prediction vs. the ground truth (inside the FOV);
4. save the ground truth as its correction (marked done);
5. every K corrections, Retrain now (M minutes, the widget's settings: held-out blocks, the
   version kept only if it beats its base) and predict the images not yet corrected again.

``--json`` writes ``{"steps": [{"images_corrected": n, "pixels_to_fix": p, "f1_rest": f,
"seconds": s, "retrained": bool, "model": ...}, ...]}``: step 0 is the model before any
correction (``pixels_to_fix`` null); ``f1_rest`` is the pooled F1 (inside the FOV) of the
predictions of the images not yet corrected, after that step's retraining, and
``f1_rest_base`` the starting model's on the same images (the paired reference: the rest
changes at every step, so only the difference of the two tells what the corrections bought); ``seconds`` the
wall time since the start. ``--plot`` draws both curves (needs matplotlib). The versions it
trains go to a temporary folder, never to the user's model menu.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
HITL_HEADING = "## Human in the loop: a simulated clinician over a folder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a pretrained name, a version or a checkpoint file")
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--masks", required=True, type=Path, help="the ground truth (the corrections a person would make)")
    parser.add_argument("--fov", type=Path, help="field-of-view masks: pixels outside are not counted")
    parser.add_argument("--order", choices=("uncertainty", "sequential", "random"), default="uncertainty")
    parser.add_argument("--finetune-every", type=int, default=5, metavar="K")
    parser.add_argument("--minutes", type=float, default=2.0, help="each retraining's time budget")
    parser.add_argument("--epochs", type=int, default=None, help="also cap each retraining at this many epochs")
    parser.add_argument("--steps", type=int, default=10, metavar="N", help="images to correct")
    parser.add_argument("--transform", default="native", help="a benchmarks/robustness.py transform applied to the images")
    parser.add_argument("--limit", type=int, default=None, help="use the first L images of the folder only")
    parser.add_argument("--validation", choices=("auto", "holdout", "images", "none"), default="auto",
                        help="how each retraining is validated (auto: the widget's; see src_models.annotation_run.auto_validation)")
    parser.add_argument("--no-rehearse", dest="rehearse", action="store_false",
                        help="retrain on the corrections alone (default: also rehearse the model's confident predictions of the rest)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="validate on the held-out corrections alone (default: also on the model's confident predictions of other uncorrected images)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--write", action="store_true", help=f"put this run's table in docs/RESULTS.md ({HITL_HEADING!r})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="for --order random")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.finetune_every < 1:
        parser.error("--steps and --finetune-every must be at least 1")
    return args


def build_folder(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """The images (transformed) in ``work/images``; the truth and FOV masks by image ID, at the image size."""
    from PIL import Image
    from robustness import TRANSFORMS, rescale_mask

    from src_models.data import image_stem, pair_files, read_image, read_mask

    if args.transform not in TRANSFORMS:
        raise SystemExit(f"unknown transform {args.transform!r}; choose one of {', '.join(TRANSFORMS)}")
    transform = TRANSFORMS[args.transform]
    folder = work / "images"
    folder.mkdir(parents=True)
    truth, fov = {}, {}
    for sample in pair_files(args.images, args.masks, args.fov)[: args.limit]:
        image = read_image(sample.image)
        if transform.image is not None:
            image = transform.image(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1))
        image_id = image_stem(sample.image)
        Image.fromarray(image).save(folder / f"{image_id}.png")
        masks = [read_mask(sample.mask), read_mask(sample.fov) if sample.fov else None]
        if transform.factor != 1:
            masks = [None if m is None else rescale_mask(m, transform.factor) for m in masks]
        truth[image_id], fov[image_id] = masks[0].astype(np.uint8), masks[1]
    return folder, truth, fov


def predict_all(session: Any, threads: int | None) -> None:
    """Predict what the session needs with its current model (the Annotate widget's worker code)."""
    from src_models.annotation_run import folder_segmenter, predict_pending

    segmenter, options = folder_segmenter(session.model)
    for _ in predict_pending(session, segmenter, options, lambda: False):
        pass


def f1_rest(session: Any, truth: dict, fov: dict, labels: dict | None = None) -> float | None:
    """Pooled F1 (inside the FOV) of the images not yet corrected: their stored predictions, or ``labels`` by ID."""
    from src_models.metrics import confusion

    rest = [i for i, e in session.entries.items() if not e.saved]
    if not rest:
        return None
    total = None
    for image_id in rest:
        predicted = labels[image_id] if labels is not None else session.prediction(image_id)[1]
        counts = confusion(predicted.astype(np.float32), truth[image_id], fov[image_id])
        total = counts if total is None else total + counts
    return float(total.metrics()["F1"])


def pixels_to_fix(session: Any, image_id: str, truth: dict, fov: dict) -> int:
    wrong = session.prediction(image_id)[1].astype(bool) != truth[image_id].astype(bool)
    return int((wrong & fov[image_id]).sum() if fov[image_id] is not None else wrong.sum())


def retrain(session: Any, args: argparse.Namespace) -> tuple[bool, str]:
    """Retrain now: the widget's request on every saved correction, adopted if it beat its base."""
    from src_models.annotation_run import adopt_version, retrain_request
    from src_models.finetune import finetune
    from src_models.user_versions import new_version_path

    base = Path(session.model).stem if session.model.endswith(".safetensors") else session.model
    request = retrain_request(session, new_version_path(base), f"simulation {len(session.saved_ids())}", minutes=args.minutes,
                              epochs=args.epochs, validation=args.validation, rehearse=args.rehearse,
                              check=args.check)
    path = finetune(request, lambda event: None, lambda: False)
    adopted, why = adopt_version(session, path) if path else (False, "no version written")
    if adopted:
        predict_all(session, args.threads)
    return adopted, why


def choose(session: Any, order: str, rng: random.Random, after: str) -> str | None:
    if order != "random":
        return session.next_id(order, after=after)
    todo = [i for i, e in session.entries.items() if not e.saved and not e.error]
    return rng.choice(todo) if todo else None


def simulate(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from src_models.annotation import FolderSession

    images, truth, fov = build_folder(args, work)
    start = time.perf_counter()
    rng = random.Random(args.seed)
    with FolderSession(images, work / "labels") as session:
        session.set_model(args.model)
        predict_all(session, args.threads)
        base = {i: session.prediction(i)[1] for i in session.entries}  # the starting model's masks: the paired reference
        everything = f1_rest(session, truth, fov)
        steps = [{"images_corrected": 0, "pixels_to_fix": None, "f1_rest": everything, "f1_rest_base": everything,
                  "seconds": time.perf_counter() - start, "retrained": False, "model": Path(session.model).stem}]
        print(f"start: {len(truth)} images, F1 of all {steps[0]['f1_rest']:.4f}", flush=True)
        current = ""
        for n in range(1, min(args.steps, len(truth)) + 1):
            current = choose(session, args.order, rng, current) or ""
            if not current:
                break
            fix = pixels_to_fix(session, current, truth, fov)
            session.save_correction(current, truth[current], done=True)
            retrained, why = retrain(session, args) if n % args.finetune_every == 0 else (False, "")
            steps.append({"images_corrected": n, "image": current, "pixels_to_fix": fix, "f1_rest": f1_rest(session, truth, fov),
                          "f1_rest_base": f1_rest(session, truth, fov, base),
                          "seconds": time.perf_counter() - start, "retrain": n % args.finetune_every == 0, "retrained": retrained,
                          "model": Path(session.model).stem})
            rest, ref = steps[-1]["f1_rest"], steps[-1]["f1_rest_base"]
            print(f"step {n}: {current} had {fix:,} px to fix; F1 of the rest {'-' if rest is None else f'{rest:.4f} (base {ref:.4f})'}"
                  + (f"; retrained: {why}" if why else ""), flush=True)
    return steps


def plot(steps: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    corrected = [s for s in steps if s["pixels_to_fix"] is not None]
    left.bar([s["images_corrected"] for s in corrected], [s["pixels_to_fix"] for s in corrected], color="#9ecae1",
             label="pixels to fix in the image corrected")
    left.set_xlabel("images corrected")
    left.set_ylabel("pixels to fix")
    right = left.twinx()
    scored = [s for s in steps if s["f1_rest"] is not None]
    right.plot([s["images_corrected"] for s in scored], [s["f1_rest"] for s in scored], "o-", color="#d62728", label="F1 of the rest")
    right.plot([s["images_corrected"] for s in scored], [s["f1_rest_base"] for s in scored], "--", color="#555555",
               label="F1 of the rest, starting model")
    right.set_ylabel("pooled F1 of the images not yet corrected")
    for s in steps:
        if s["retrained"]:
            left.axvline(s["images_corrected"], color="grey", lw=0.6, ls=":")
    left.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.savefig(path)


def run_lines(about: dict[str, Any], steps: list[dict[str, Any]]) -> list[str]:
    """One run's block for docs/RESULTS.md: its heading, how it was measured and the table of steps."""
    from results_io import cpu_description

    start, last = steps[0], steps[-1]
    fixes = [s["pixels_to_fix"] for s in steps[1:]]
    lines = [run_heading(about), "",
             f"Reproduce with `.venv/bin/python {about['command']}`. Measured {about['date']} on {cpu_description()}, "
             f"{about['threads']} thread(s); wall time {last['seconds'] / 60:.1f} min. F1 of the images not yet corrected: "
             f"{start['f1_rest']:.4f} before any correction, {last['f1_rest']:.4f} after {last['images_corrected']} "
             f"(the starting model on those: {last['f1_rest_base']:.4f})"
             + (f"; pixels to fix per image: {fixes[0]:,} for the first, {fixes[-1]:,} for the last." if fixes else "."), "",
             "| images corrected | image | pixels to fix | F1 of the rest | starting model on the rest | gain | retrained | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        fix = "-" if s["pixels_to_fix"] is None else f"{s['pixels_to_fix']:,}"
        rest, ref = s["f1_rest"], s.get("f1_rest_base")
        scores = "- | - | -" if rest is None or ref is None else f"{rest:.4f} | {ref:.4f} | {rest - ref:+.4f}"
        retrained = "" if not s.get("retrain") else "yes (adopted)" if s["retrained"] else "yes (kept the model)"
        lines.append(f"| {s['images_corrected']} | {s.get('image', '-')} | {fix} | {scores} | {retrained} | {s['seconds'] / 60:.1f} |")
    return [*lines, ""]


def plot_title(about: dict[str, Any]) -> str:
    return run_heading(about).removeprefix("### ").replace("`", "")


def run_heading(about: dict[str, Any]) -> str:
    rehearse = ("" if about.get("rehearse", True) else ", no rehearsal") + ("" if about.get("check", True) else ", no check on the rest")
    return (f"### `{about['model']}`, {about['transform']}, order {about['order']}, retrain every {about['finetune_every']} "
            f"for {about['minutes']:g} min{rehearse}")


def write_run(about: dict[str, Any], steps: list[dict[str, Any]]) -> None:
    """Replace this run's block (same heading) in the section :data:`HITL_HEADING`, keeping the others."""
    import results_io

    body = results_io.section_body(results_io.RESULTS.read_text(), HITL_HEADING) or ""
    parts = re.split(r"(?m)^(?=### )", body)
    intro = "" if parts[0].startswith("### ") else parts[0].strip()
    heading = run_heading(about)
    kept = [p.rstrip("\n") + "\n" for p in parts if p.startswith("### ") and p.splitlines()[0] != heading]
    lines = [intro or HITL_INTRO, "", *kept, *run_lines(about, steps)]
    results_io.write_section(HITL_HEADING, lines, results_io.RESULTS)


HITL_INTRO = ("`benchmarks/hitl_simulation.py` runs the Annotate folder widget's own code: it predicts the folder, takes the next "
              "image in the chosen order, counts the pixels a person would fix (prediction vs. ground truth, inside the FOV), saves "
              "the ground truth as that image's correction and, every K corrections, retrains as Retrain now does (validated on "
              "whole held-out corrections from 3 on, one in five; below that on held-out blocks for a tiled model, not at all for a "
              "whole-image one, and, unless `--no-check`, on the model's confident predictions of other uncorrected images; the "
              "version adopted only if it beats the folder's model there; rehearsing the model's confident predictions of as many "
              "uncorrected images unless `--no-rehearse`) and predicts the rest again. 'F1 of the rest' is "
              "the pooled F1 of the images not yet corrected; the starting model's F1 on the same images is the paired reference "
              "(the rest changes at every step, and an uncertainty order takes the hardest images first, so only the gain column "
              "tells what the corrections bought). The ground truth replaces the whole prediction, so every pixel where the model "
              "and the annotator disagree counts as corrected (weighted up in training): more than a person would repaint.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--write-from"] and (len(argv) == 2 or len(argv) == 4 and argv[2] == "--plot"):  # a run saved with --json
        saved = {"threads": "all", "date": "?", **json.loads(Path(argv[1]).read_text())}
        write_run(saved, saved["steps"])
        if len(argv) == 4:
            plot(saved["steps"], Path(argv[3]), plot_title(saved))
        return 0
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="r2unet-hitl-") as work:
        os.environ["R2UNET_MODELS_DIR"] = str(Path(work) / "versions")  # never the user's model menu
        steps = simulate(args, Path(work))
    import datetime

    about = {"model": args.model, "order": args.order, "finetune_every": args.finetune_every, "minutes": args.minutes,
             "transform": args.transform, "rehearse": args.rehearse, "check": args.check, "threads": args.threads or "all", "date": datetime.date.today().isoformat(),
             "command": "benchmarks/hitl_simulation.py " + " ".join(argv)}
    if args.json:
        args.json.write_text(json.dumps({**about, "steps": steps}, indent=1))
    if args.write:
        write_run(about, steps)
    if args.plot:
        plot(steps, args.plot, plot_title(about))
    return 0


if __name__ == "__main__":
    sys.exit(main())
