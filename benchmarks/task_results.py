"""Skin-lesion and lung-field results of the ``resize``-geometry models, their installation and
their section of docs/RESULTS.md.

Usage:
    .venv/bin/python benchmarks/task_results.py [--runs runs] [--install] [--datasets ../shared/datasets]

For each ``RUNS/{r2unet,unet}-{skin,lung}.safetensors`` (written by ``r2unet train --geometry
resize``): run ``r2unet evaluate --json`` on the task's test split (ISIC 2017 val/, 150 pairs;
CXR-Lungs test/, 55 pairs), once with the card's threshold and post-processing and once with
``--no-postprocess``; write the section of docs/RESULTS.md headed :data:`HEADING` (the DRIVE and
fine-tuning sections are kept). With ``--install`` each checkpoint is copied into
``src_models/weights/`` with the test metrics (post-processed, pooled and per-image means) and a
short data name in its model card, so ``r2unet models`` and the napari menu show them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from results_io import ROOT, TASKS_HEADING, cli_evaluate, inherit_parent_command, parent_line, write_section

HEADING = TASKS_HEADING
TASKS = {  # task -> test split, short data name for menus, reference figures, targets (must, aim)
    "skin": {"images": "ISIC2017/val/images", "masks": "ISIC2017/val/masks", "short": "ISIC 2017",
             "split": "ISIC 2017 val (150 images, the challenge's validation set)",
             "references": ["R2U-Net as reported for the paper's skin test set: Dice 0.8920 (another split)",
                            "ISIC 2017 winner (Yuan et al.) on its test set: Dice about 0.849, mean Jaccard 0.765"],
             "targets": [("pooled Dice", "pooled", "F1", 0.85, 0.89), ("mean per-image Jaccard", "mean", "JS", 0.765, 0.80)],
             "tta": True},  # trained with flips and rot90: the card asks for the mean of the 4 flips
    "lung": {"images": "CXR-Lungs/test/images", "masks": "CXR-Lungs/test/masks", "short": "chest X-ray",
             "split": "CXR-Lungs test (55 images, every 5th by name)",
             "references": ["U-Net-type networks on public chest X-ray sets (JSRT, Montgomery): Dice about 0.97-0.98"],
             "targets": [("pooled Dice", "pooled", "F1", 0.965, 0.975)],
             "tta": False},  # upright chest X-rays, trained without vertical flips: no flip TTA
}
ARCHS = ("r2unet", "unet")


def evaluate(model: Path, images: Path, masks: Path, *options: str) -> tuple[dict, float]:
    """``r2unet evaluate --json [options]`` on one split: its JSON result and the seconds per image."""
    return cli_evaluate(model, images, masks, options=["--device", "cpu", *options])


def _row(name: str, result: dict, seconds: float) -> str:
    pooled, mean = result["pooled"], result["mean"]
    cells = [pooled["F1"], pooled["JS"], mean["F1"], mean["JS"], pooled["SE"], pooled["SP"], pooled["AUC"]]
    return f"| {name} | " + " | ".join(f"{v:.4f}" for v in cells) + f" | {seconds:.2f} |"


def _targets(task: str, results: dict[str, dict]) -> list[str]:
    lines = []
    for label, where, key, must, aim in TASKS[task]["targets"]:
        for arch in ARCHS:
            if arch in results:
                value = results[arch][where][key]
                verdict = "aim met" if value >= aim else "must met, aim not" if value >= must else "NOT met"
                lines.append(f"- {arch}-{task} {label} {value:.4f}: must >= {must}, aim >= {aim}: {verdict}.")
    return lines


def _details(path: Path, seconds: float) -> str:
    from src_models.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    prov, card = ck.provenance, ck.model_card
    params = sum(v.numel() for k, v in ck.state_dict.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    train = prov.get("train_config", {})
    return (f"- `{path.stem}`: {ck.config.arch}, widths {list(ck.config.widths)}, t={ck.config.t}, {params:,} parameters, "
            f"{path.stat().st_size / 1e6:.1f} MB; {card.geometry.describe()}; threshold {card.threshold:g}, post-processing "
            f"{card.postprocess.describe()}; best epoch {prov.get('best_epoch')}{' of ' + str(train['epochs']) if train.get('epochs') else ''} "
            f"({prov.get('budget')}), seed {train.get('seed')}, augmentation rotate {train.get('rotate')} deg, "
            f"{'zoom ' + str(train['zoom']) if train.get('zoom') else 'scale ' + str(train.get('scale'))}, "
            f"aspect {train.get('aspect', 0.0)}, rot90 {train.get('rot90')}; test-time augmentation {'on' if card.tta else 'off'}; "
            f"training wall time to the best epoch {prov.get('wall_time_s', 0) / 60:.0f} min on {prov.get('machine')}; "
            f"evaluation {seconds:.2f} s per test image (read, infer, write; whole command).\n"
            f"  Command (its last invocation): `{prov.get('command')}`"
            + parent_line(prov))


SELF_TRAINING = [
    "Self-training (a card whose data names pseudo-labelled images): before such a run, the model it starts from",
    "(`--init`) segmented ISIC 2017's 600 unlabelled test images, `r2unet predict MODEL .../ISIC2017/test/images --out PRED",
    "--save-prob`, and `benchmarks/pseudo_labels.py --pred PRED --pool .../ISIC2017/test/images --images",
    ".../ISIC2017/train/images --masks .../ISIC2017/train/masks --out DATA` kept the 420 most confident of them (fewest",
    "pixels with 0.2 < p < 0.8 per predicted lesion pixel; 1-95 % lesion) with their predicted masks beside the 2000",
    "labelled pairs; `--val-ids` (DATA/val_ids.txt) held out the last 200 labelled IDs, so checkpoints were chosen on",
    "real masks only. No mask of val/ or test/ is read in training.",
    "",
]


def _card_data(path: Path) -> str:
    from src_models.checkpoint import load_checkpoint

    return load_checkpoint(path).model_card.data if path.exists() else ""


def install(path: Path, task: str, result: dict) -> Path:
    from src_models.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(path)
    metrics = {**{k: round(v, 4) for k, v in result["pooled"].items()},
               **{f"mean {k}": round(v, 4) for k, v in result["mean"].items() if k in ("F1", "JS")}}
    card = ck.model_card.with_(metrics=metrics, data_short=TASKS[task]["short"], tta=TASKS[task]["tta"],
                               metrics_on=f"{TASKS[task]['split']}, pooled (and mean per image), the card's threshold, "
                                          f"post-processing and test-time augmentation")
    provenance = {**ck.provenance, "validation_metrics": ck.provenance.get("validation_metrics") or ck.provenance.get("metrics", {}), "metrics": metrics,
                  "metrics_on": card.metrics_on}
    target = ROOT / "src_models" / "weights" / path.name
    provenance = inherit_parent_command(provenance, target)
    save_checkpoint(target, ck.state_dict, ck.config, ck.preprocess, ck.class_names, provenance, card=card)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--install", action="store_true", help="copy the evaluated checkpoints into src_models/weights/")
    args = parser.parse_args()
    lines = ["Reproduce with `.venv/bin/python benchmarks/task_results.py` after the training commands below; each",
             "row is `r2unet evaluate MODEL --images ... --masks ...` on the task's test split (`--json`), with the",
             "card's threshold and post-processing, and once more with `--no-postprocess`. Dice = F1; pooled figures",
             "count all pixels of the split, mean figures average the images (ISIC ranks by the mean Jaccard).",
             "The skin cards ask for test-time augmentation (the mean of the 4 flips; the models were trained with",
             "flips and 90-degree rotations); `--no-tta` rows show them without. A command with `--init MODEL` started",
             "from that model's weights (its own command follows), with a new schedule.",
             "A command ending in `--resume --epochs N` continued a run started by the same command without",
             "`--resume` and with a larger `--epochs`, stopped with Ctrl-C (the cosine schedule then decays over the",
             "remaining steps). Wall times include that first part and are inflated: four trainings, test runs and",
             "other work shared the 2 cores (each training had `--threads 1`).",
             ""]
    if any("pseudo-labelled" in _card_data(args.runs / f"{arch}-skin.safetensors") for arch in ARCHS):
        lines += SELF_TRAINING
    for task, spec in TASKS.items():
        images, masks = args.datasets / spec["images"], args.datasets / spec["masks"]
        runs = [args.runs / f"{arch}-{task}.safetensors" for arch in ARCHS if (args.runs / f"{arch}-{task}.safetensors").exists()]
        if not runs or not images.is_dir():
            print(f"{task}: no runs in {args.runs} or no data in {images}: skipped")
            continue
        rows, details, results = [], [], {}
        for run in runs:
            flips = ["--tta"] if spec["tta"] else []  # as the installed card will say
            result, seconds = evaluate(run, images, masks, *flips)
            raw, _ = evaluate(run, images, masks, *flips, "--no-postprocess")
            arch = run.stem.split("-")[0]
            results[arch] = result
            print(f"{run.stem}: pooled Dice {result['pooled']['F1']:.4f}, mean Jaccard {result['mean']['JS']:.4f}")
            rows += [_row(f"**{run.stem}**", result, seconds), _row(f"{run.stem}, `--no-postprocess`", raw, seconds)]
            if flips:
                plain, plain_seconds = evaluate(run, images, masks, "--no-tta")
                rows.append(_row(f"{run.stem}, `--no-tta`", plain, plain_seconds))
            if args.install:
                print(f"installed {(installed := install(run, task, result))}")
            details.append(_details(installed if args.install else run, seconds))
        lines += [f"### {spec['split']}", "",
                  "| model | pooled Dice | pooled Jaccard | mean Dice | mean Jaccard | SE | SP | AUC | s/image |",
                  "|---|---|---|---|---|---|---|---|---|", *rows, "", "References (not the same images):",
                  *[f"- {r}" for r in spec["references"]], "", "Targets:", *_targets(task, results), "", *details, ""]
    write_section(HEADING, lines)
    print("wrote the section of docs/RESULTS.md")


if __name__ == "__main__":
    main()
