"""DRIVE test-set results of trained models, the shipped pretrained files and docs/RESULTS.md.

Usage:
    .venv/bin/python benchmarks/drive_results.py [--runs runs] [--install] [--tta] [--drive ../shared/datasets/DRIVE]
    .venv/bin/python benchmarks/drive_results.py --scale-only

For every ``RUNS/<arch>-drive.safetensors`` (written by ``r2unet train``): evaluate it on the 20
DRIVE test images against ``1st_manual`` inside the FOV masks, all pixels pooled (the protocol of
the DRIVE README), threshold 0.5; measure the second human observer the same way; write
docs/RESULTS.md and, if matplotlib is installed, docs/training_curves.png from each run's
``.history.json``. With ``--install`` the checkpoints are copied into ``src_models/weights/``
with the test-set metrics added to their provenance (the validation metrics are kept) and to their
model card (the rest of the card is kept), and the card gets the training scale (the median
field-of-view diameter of DRIVE's training images, for ``--scale auto``) if it has none;
``--scale-only`` does only that to the installed DRIVE models.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from results_io import ROOT, inherit_parent_command, kept_sections, parent_line

from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.data import pair_files, read_image, read_mask
from src_models.inference import Segmenter
from src_models.metrics import METRIC_NAMES, MetricAccumulator
from src_models.preprocessing import to_chw
from src_models.scale import Scale, median_fov_diameter
from src_models.training import history_path

PAPER = {  # Alom et al. 2018, as quoted in ../shared/datasets/DRIVE/README.md
    "U-Net (paper)": {"F1": 0.8142, "SE": 0.7537, "SP": 0.9820, "ACC": 0.9531, "AUC": 0.9755},
    "ResU-Net (paper)": {"F1": 0.8149, "SE": 0.7726, "SP": 0.9820, "ACC": 0.9553, "AUC": 0.9779},
    "RU-Net (paper)": {"F1": 0.8155, "SE": 0.7751, "SP": 0.9816, "ACC": 0.9556, "AUC": 0.9782},
    "R2U-Net (paper)": {"F1": 0.8171, "SE": 0.7792, "SP": 0.9813, "ACC": 0.9556, "AUC": 0.9784},
}
ORDER = ("unet", "resunet", "runet", "r2unet")


def evaluate(path: Path, drive: Path, tta: bool = False) -> tuple[dict[str, float], float]:
    segmenter = Segmenter(load_checkpoint(path), "cpu", tta=tta)
    acc = MetricAccumulator()
    start = time.perf_counter()
    for s in pair_files(drive / "test" / "images", drive / "test" / "1st_manual", drive / "test" / "mask"):
        acc.add(segmenter.predict(read_image(s.image))[0], read_mask(s.mask), read_mask(s.fov))
    return acc.pooled(), (time.perf_counter() - start) / 20


def second_observer(drive: Path) -> dict[str, float]:
    acc = MetricAccumulator()
    firsts = pair_files(drive / "test" / "images", drive / "test" / "1st_manual", drive / "test" / "mask")
    seconds = {s.id: s.mask for s in pair_files(drive / "test" / "images", drive / "test" / "2nd_manual")}
    for s in firsts:
        acc.add(read_mask(seconds[s.id]).astype(np.float64), read_mask(s.mask), read_mask(s.fov))
    result = acc.pooled()
    result["AUC"] = float("nan")  # a binary mask has no ROC curve worth the name
    return result


def _row(name: str, m: dict[str, float]) -> str:
    cells = [f"{m[k]:.4f}" if k in m and m[k] == m[k] else "-" for k in ("F1", "SE", "SP", "ACC", "AUC")]
    return f"| {name} | " + " | ".join(cells) + " |"


def _reading(scores: dict[str, dict[str, float]]) -> list[str]:
    """Sentences computed from the numbers: targets met or not, and the ranking."""
    lines = []
    paper = PAPER["R2U-Net (paper)"]
    r2 = scores.get("r2unet-drive")
    if r2:
        met = r2["F1"] >= paper["F1"] and r2["AUC"] >= paper["AUC"]
        lines.append(
            f"- R2U-Net vs the paper's own figures (F1 {paper['F1']}, AUC {paper['AUC']}): ours F1 {r2['F1']:.4f}, "
            f"AUC {r2['AUC']:.4f}: {'met' if met else 'NOT met'}. The stretch goal (F1 >= 0.82 and AUC >= 0.980): "
            f"F1 {'met' if r2['F1'] >= 0.82 else 'not met'}, AUC {'met' if r2['AUC'] >= 0.980 else 'not met'} (see the --tta row for test-time augmentation)."
        )
    ranked = sorted(scores, key=lambda n: -scores[n]["F1"])
    lines.append("- Ranking by F1 (one seed each): " + " > ".join(f"{n} {scores[n]['F1']:.4f}" for n in ranked) + ".")
    order = [n for n in ("r2unet-drive", "runet-drive", "unet-drive") if n in scores]
    claimed = all(scores[a]["F1"] >= scores[b]["F1"] for a, b in zip(order, order[1:]))
    lines.append(
        "- The paper's ranking R2U-Net >= RU-Net >= U-Net at (almost) equal parameters is "
        + ("reproduced." if claimed else "NOT fully reproduced: the differences between our models are a few thousandths "
           "of F1, within what a different seed or validation split changes, so one run each cannot rank them.")
    )
    lines.append(
        "- Our models trade specificity for sensitivity compared with the paper (higher SE, lower SP at the same "
        "threshold 0.5): half of the training patches are centred on vessel pixels and the loss includes Dice."
    )
    return lines


def _augmentation(train: dict) -> str:
    """The camera augmentation of a run, in words (empty for the defaults)."""
    parts = [f"zoom {train['zoom'][0]:g}-{train['zoom'][1]:g}" if train.get("zoom") else ""]
    parts += [f"gamma exp(+-{train['gamma']:g})" if train.get("gamma", 0.25) != 0.25 else "",
              f"blur up to sigma {train['blur']:g}" if train.get("blur") else "", f"JPEG down to {train['jpeg']}" if train.get("jpeg") else ""]
    parts = [p for p in parts if p]
    return f"augmentation {', '.join(parts)}; " if parts else ""


def plot_curves(runs: list[Path], target: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves PNG (pip install matplotlib)")
        return False
    runs = [run for run in runs if history_path(run).exists()]
    if not runs:
        print("no run has a .history.json: the curves PNG is kept as it is")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        history = json.loads(history_path(run).read_text())
        epochs = [h["epoch"] for h in history]
        label = run.stem.removesuffix("-drive")
        ax1.plot(epochs, [h["train_loss"] for h in history], label=label)
        ax2.plot(epochs, [h.get("val_F1", np.nan) for h in history], label=label)
    ax1.set(xlabel="epoch", ylabel="training loss (BCE + Dice)", title="training loss")
    ax2.set(xlabel="epoch", ylabel="F1", title="validation F1 (DRIVE 39, 40)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    return True


def training_scale(ck, drive: Path) -> Scale:
    """The card's training scale: the one it has, else the median FOV diameter of DRIVE's training images."""
    if ck.model_card.scale.kind != "none":
        return ck.model_card.scale
    images = [to_chw(read_image(p.image)) for p in pair_files(drive / "training" / "images")]
    return Scale("fov_diameter", median_fov_diameter(images))


def set_installed_scale(drive: Path) -> None:
    """``--scale-only``: add the training scale to the cards of the installed DRIVE models (weights unchanged)."""
    for weights in sorted((ROOT / "src_models" / "weights").glob("*-drive.safetensors")):
        ck = load_checkpoint(weights)
        card = ck.model_card.with_(scale=training_scale(ck, drive))
        save_checkpoint(weights, ck.state_dict, ck.config, ck.preprocess, ck.class_names, ck.provenance, card=card)
        print(f"{weights.name}: {card.scale.describe()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--drive", type=Path, default=ROOT.parent / "shared" / "datasets" / "DRIVE")
    parser.add_argument("--install", action="store_true", help="copy the evaluated checkpoints into src_models/weights/")
    parser.add_argument("--tta", action="store_true", help="also evaluate with test-time augmentation (4x slower)")
    parser.add_argument("--scale-only", action="store_true", help="only add the training scale (FOV diameter) to the installed models' cards")
    args = parser.parse_args()
    if args.scale_only:
        return set_installed_scale(args.drive)
    runs = sorted(args.runs.glob("*-drive.safetensors"), key=lambda p: ORDER.index(p.stem.split("-")[0]) if p.stem.split("-")[0] in ORDER else 9)
    rows, details, scores = [], [], {}
    for run in runs:
        metrics, seconds = evaluate(run, args.drive)
        ck = load_checkpoint(run)
        prov = ck.provenance
        print(f"{run.stem}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_NAMES))
        scores[run.stem] = metrics
        rows.append(_row(f"**{run.stem} (ours)**", metrics))
        if args.tta:
            tta_metrics, tta_seconds = evaluate(run, args.drive, tta=True)
            print(f"{run.stem} --tta: " + "  ".join(f"{k} {tta_metrics[k]:.4f}" for k in METRIC_NAMES))
            rows.append(_row(f"{run.stem} (ours, --tta: mean of 4 flips, {tta_seconds:.1f} s/image)", tta_metrics))
        details.append(
            f"- `{run.stem}`: {ck.config.arch}, widths {list(ck.config.widths)}, t={ck.config.t}, "
            f"{sum(v.numel() for k, v in ck.state_dict.items() if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))):,} parameters; "
            f"best epoch {prov.get('best_epoch')} of {prov.get('train_config', {}).get('epochs')}, seed {prov.get('train_config', {}).get('seed')}; "
            f"training wall time to the best epoch {prov.get('wall_time_s', 0) / 60:.1f} min on {prov.get('machine')}; "
            f"{_augmentation(prov.get('train_config', {}))}inference {seconds:.2f} s per test image.\n  Command: `{prov.get('command')}`"
        )
        weights = ROOT / "src_models" / "weights" / run.name
        prov = inherit_parent_command(prov, weights)
        details[-1] += parent_line(prov)
        if args.install:
            installed = dict(prov)
            installed["validation_metrics"] = prov.get("validation_metrics") or prov.get("metrics", {})  # an installed model: kept
            installed["metrics"] = {k: round(v, 4) for k, v in metrics.items()}
            installed["metrics_on"] = "DRIVE test set, 20 images, 1st_manual, inside FOV, pooled, threshold 0.5"
            installed["license"] = "weights: BSD-3-Clause (this project); trained on DRIVE (research use)"
            # the card travels with the weights (task, geometry, threshold, ...), with the test-set numbers
            card = ck.model_card.with_(metrics=installed["metrics"], metrics_on=installed["metrics_on"],
                                       licence=ck.model_card.licence or installed["license"], scale=training_scale(ck, args.drive))
            save_checkpoint(weights, ck.state_dict, ck.config, ck.preprocess, ck.class_names, installed, card=card)
            print(f"installed {weights} ({weights.stat().st_size / 1e6:.1f} MB)")
    human = second_observer(args.drive)
    curves = plot_curves(runs, ROOT / "docs" / "training_curves.png") if runs else False
    lines = [
        "# Results on DRIVE",
        "",
        "Protocol (from `../shared/datasets/DRIVE/README.md`): trained on the 20 training images (18 for",
        "training, 39 and 40 held out for checkpoint selection), evaluated on the 20 test images against",
        "`1st_manual`, counting only pixels inside the FOV masks, all test pixels pooled; threshold 0.5",
        "for SE/SP/ACC/F1, AUC from the probability maps. Reproduce every number of this page with",
        "`.venv/bin/python benchmarks/drive_results.py --tta` after the training commands below.",
        "",
        "| system | F1 | SE | SP | ACC | AUC |",
        "|---|---|---|---|---|---|",
        _row("second human observer (2nd_manual)", human),
        *[_row(name, m) for name, m in PAPER.items()],
        *rows,
        "",
        "## Reading the table",
        "",
        *_reading(scores),
        "",
        "## Our models",
        "",
        *details,
        "",
        "Each model trained with one CPU thread (`--threads 1`) while another training used the other",
        "core of the same 2-core machine, so the wall times above are what a laptop without a GPU pays.",
        "",
    ]
    if curves or (ROOT / "docs" / "training_curves.png").exists():  # an earlier PNG stays linked
        lines += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    (ROOT / "docs").mkdir(exist_ok=True)
    results = ROOT / "docs" / "RESULTS.md"
    # sections written by other benchmarks (fine-tuning, the other tasks, robustness) stay as they are
    kept = kept_sections(results.read_text()) if results.exists() else ""
    results.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    print("wrote docs/RESULTS.md")


if __name__ == "__main__":
    main()
