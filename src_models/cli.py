"""The ``r2unet`` command line: argument parsing and printing only; the work is done elsewhere.

Subcommands: ``models``, ``info``, ``predict``, ``evaluate``. Every user error is one line on
stderr (``r2unet: error: ...``) and exit status 1 (2 for bad arguments, 130 when interrupted);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import R2UNetError
from .settings import (
    AUTO_OVERLAP_PIXELS,
    AUTO_TILE,
    AUTO_WHOLE_IMAGE_PIXELS,
    DEFAULT_THRESHOLD,
    MAX_OVERLAP,
    THRESHOLD_RANGE,
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


# -- helpers ---------------------------------------------------------------------------------
def _progress_bar(description: str) -> tuple[Callable[[float], None], Callable[[], None]]:
    """A tqdm bar on a terminal (stderr), nothing otherwise; returns (update(fraction), close)."""
    if not sys.stderr.isatty():
        return (lambda fraction: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=description, unit="‰", leave=False, file=sys.stderr, bar_format="{desc} {bar} {percentage:3.0f}% {elapsed}<{remaining}")

    def update(fraction: float) -> None:
        bar.update(max(0, round(fraction * 1000) - bar.n))

    return update, bar.close


def _log(message: str) -> None:
    print(f"r2unet: {message}", file=sys.stderr)


def _fmt(value: float) -> str:
    return "  nan " if math.isnan(value) else f"{value:.4f}"


def _expand_inputs(inputs: Sequence[str]) -> list[Path]:
    from .data import list_images

    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            files.append(path)
        else:
            raise R2UNetError(f"input {path} does not exist")
    return files


def _existing_inputs(inputs: list[str]) -> list[Path]:
    """The images of ``inputs`` that exist, for ``--compile auto`` to weigh (the errors come later)."""
    with contextlib.suppress(R2UNetError, OSError):
        return _expand_inputs(inputs)
    return [Path(item).expanduser() for item in inputs if Path(item).expanduser().is_file()]


def _output_paths(files: list[Path], out_dir: Path, save_prob: bool) -> list[tuple[Path, Path | None]]:
    """``(mask, prob)`` paths per input (a NIfTI input's mask is ``<stem>.nii.gz``, the rest TIFF);
    refuses any that would overwrite an input or each other."""
    from .data import image_stem
    from .medical_io import medical_kind

    def mask_suffix(f: Path) -> str:
        return ".nii.gz" if medical_kind(f, sniff=False) == "nifti" else ".tif"

    outputs = [(out_dir / f"{image_stem(f)}{mask_suffix(f)}", out_dir / f"{image_stem(f)}_prob.tif" if save_prob else None)
               for f in files]
    written = [p for pair in outputs for p in pair if p is not None]
    resolved = [p.resolve() for p in written]
    inputs = {f.resolve() for f in files}
    for path, real in zip(written, resolved):
        if real in inputs:
            raise R2UNetError(f"output {path} would overwrite an input image; choose another --out folder")
        if resolved.count(real) > 1:
            raise R2UNetError(f"two inputs would both write {path}; predict them into different folders")
    return outputs


def _segmenter(args: argparse.Namespace, files: list[Path]) -> Any:
    """The run's Segmenter; ``files``: the images it will segment (``--compile auto`` weighs them)."""
    from .compiled import resolve_compile
    from .inference import Segmenter
    from .model_names import load_model

    _freeze_startup()  # torch is imported by now
    checkpoint = load_model(args.model)
    compile = resolve_compile(args.compile, files, bf16=_bf16_possible(args, checkpoint) and not _openvino_runs(args))
    segmenter = Segmenter(checkpoint, device=args.device, log=_log, tta=args.tta, backend=args.backend,
                          scale=args.scale, precision=args.precision, compile=compile)
    _freeze_startup()  # and onnxruntime, the model
    return segmenter


def _openvino_runs(args: argparse.Namespace) -> bool:
    """Whether OpenVINO would run this run's bf16 (no compiling needed then)."""
    from .inference import BACKEND_ENV, openvino_runs_bf16

    return openvino_runs_bf16("cpu" if args.device in ("auto", "cpu") else args.device, os.environ.get(BACKEND_ENV) or args.backend)


def _bf16_possible(args: argparse.Namespace, checkpoint: Any) -> bool:
    """Whether this run would run bf16 on the CPU if compiled (what ``--compile auto`` waits for)."""
    from .inference import PRECISION_ENV
    from .precision import resolve_precision

    from_env = os.environ.get(PRECISION_ENV) if args.precision == "auto" else None
    if args.device not in ("auto", "cpu"):
        return False
    return resolve_precision(from_env or args.precision, "cpu", checkpoint.model_card.bf16, fast=True,
                             name=PRECISION_ENV if from_env else "precision")[0] == "bf16"


_FROZE: list[bool] = []  # whether this run froze the collector (main() unfreezes what it froze)


def _freeze_startup() -> None:
    """Keep what start-up made (torch, onnxruntime, the model: ~170,000 objects) out of the cyclic
    garbage collector: each full collection would scan them all (0.05 s on 2 cores), and one fell
    inside the first image: a fifth of what the first image cost over a warm one. Objects made
    later are collected as usual."""
    if _FROZE or gc.get_freeze_count() == 0:  # not when the embedding program froze its own
        gc.freeze()
        _FROZE[:] = [True]


def _predict_options(args: argparse.Namespace, checkpoint: Any) -> Any:
    """The run's options: the card's threshold and post-processing unless --threshold / --no-postprocess."""
    from .predict import card_options

    return card_options(checkpoint, args.threshold, not args.no_postprocess, tile=args.tile, overlap=args.overlap,
                        batch_size=args.batch_size, stack=args.stack)


def _options_line(args: argparse.Namespace, options: Any, tta: bool = False) -> str:
    """Which threshold, post-processing and TTA a run uses, and where they come from."""
    threshold = "--threshold" if args.threshold is not None else "the model card"
    post = "--no-postprocess" if args.no_postprocess else "the model card"
    flips = ("--tta" if args.tta else "--no-tta" if args.tta is False else "the model card") if tta or args.tta is False else ""
    return (f"threshold {options.threshold:g} ({threshold}); post-processing: {options.postprocess.describe()} ({post})"
            + (f"; test-time augmentation: {'mean of 4 flips' if tta else 'off'} ({flips})" if flips else ""))


def _log_once() -> Callable[[str], None]:
    """A :func:`_log` that says each distinct line once per run (a notice shared by many images)."""
    said: set[str] = set()

    def log(message: str) -> None:
        if message not in said:
            said.add(message)
            _log(message)

    return log


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Callable[[float], None]]:
    update, close = _progress_bar(description)
    try:
        yield update
    finally:
        close()


# -- subcommands -------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from .model_names import pretrained_models
    from .nets import ARCHITECTURES, ModelConfig, build_model, count_parameters

    archs = [
        {"name": name, "description": text, "parameters": count_parameters(build_model(ModelConfig(arch=name)))}
        for name, text in ARCHITECTURES.items()
    ]
    pretrained = [
        {"name": p.name, "arch": p.config.arch, "task": p.card.task, "description": p.description, "metrics": p.metrics,
         "path": str(p.path), "card": p.card.to_dict()}
        for p in pretrained_models().values()
    ]
    from .user_versions import list_versions, user_models_dir

    versions = [
        {"name": v.name, "id": v.id, "arch": v.arch, "task": v.card.task, "parent": v.parent, "created": v.created,
         "metrics": v.metrics, "metrics_before": v.metrics_before, "path": str(v.path), "card": v.card.to_dict()}
        for v in list_versions()
    ]
    if args.json:
        print(json.dumps({"architectures": archs, "pretrained": pretrained, "versions": versions}, indent=2))
        return 0
    print("Architectures (default widths 16-256, t=2; untrained, for 'r2unet train'):")
    for a in archs:
        print(f"  {a['name']:<9} {a['parameters']:>9,} params  {a['description']}")
    print("\nPretrained models (use as MODEL in predict/evaluate; 'r2unet info MODEL' shows its card):")
    if not pretrained:
        print("  none shipped in this version yet; give a checkpoint path (.safetensors) instead")
    for p in pretrained:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in p["metrics"].items() if isinstance(v, (int, float)))
        print(f"  {p['name']:<16} {p['arch']:<8} {p['task'] or '-':<16} {scores}  {p['description']}")
    print(f"\nFine-tuned versions in {user_models_dir()} (use the name or the id as MODEL):")
    if not versions:
        print("  none yet (the napari Fine-tune widget writes them here; set R2UNET_MODELS_DIR to move the folder)")
    for v in versions:
        f1 = f"val F1 {v['metrics_before']['F1']:.4f} -> {v['metrics']['F1']:.4f}" if "F1" in v["metrics"] and "F1" in v["metrics_before"] else ""
        print(f"  {v['name']:<28} {v['id']:<36} {v['arch']:<8} {v['task'] or '-':<16} from {v['parent'] or '?'}  {v['created'][:16]}  {f1}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model_card import ModelCard
    from .model_names import resolve_config
    from .nets import ARCHITECTURES, build_model, count_parameters, flops_per_megapixel

    rows = []
    for spec in args.model or list(ARCHITECTURES):
        config, checkpoint = resolve_config(spec)
        overrides = {k: v for k, v in (("widths", args.widths), ("t", args.t), ("in_channels", args.in_channels)) if v is not None}
        if overrides:
            if checkpoint is not None:
                raise R2UNetError("--widths/--t/--in-channels apply to architecture names, not to trained models")
            try:
                config = config.replace(**overrides)
            except ValueError as exc:
                raise R2UNetError(str(exc)) from exc
        row: dict[str, Any] = {
            "model": spec,
            "arch": config.arch,
            "config": config.to_dict(),
            "parameters": count_parameters(build_model(config)),
            "gflops_per_megapixel": round(flops_per_megapixel(config) / 1e9, 3),
        }
        if checkpoint is not None:
            row.update(preprocess=checkpoint.preprocess.to_dict(), class_names=list(checkpoint.class_names),
                       provenance=checkpoint.provenance, sha256=checkpoint.sha256, card=checkpoint.model_card.to_dict())
        rows.append(row)
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return 0
    base = next((r["parameters"] for r in rows if r["arch"] == "unet"), None)
    print(f"{'model':<16} {'arch':<8} {'widths':<22} {'t':>2} {'params':>10} {'vs U-Net':>8} {'GFLOP/MP':>9}")
    for r in rows:
        c = r["config"]
        ratio = f"{r['parameters'] / base:.3f}" if base else "-"
        print(f"{r['model']:<16} {r['arch']:<8} {','.join(map(str, c['widths'])):<22} {c['t']:>2} {r['parameters']:>10,} {ratio:>8} {r['gflops_per_megapixel']:>9.1f}")
    for r in rows:
        if "provenance" in r:
            print(f"\n{r['model']}: preprocess {r['preprocess']}, classes {r['class_names']}, sha256 {r['sha256'][:16]}...")
            print("  model card:")
            for line in ModelCard.from_dict(r["card"]).lines():
                print(f"    {line}")
            print("  provenance:")
            for k, v in sorted(r["provenance"].items()):
                print(f"    {k}: {_shown(v)}")
    return 0


def _shown(value: Any, longest: int = 6) -> str:
    """A provenance value in one readable line: lists of more than ``longest`` items (a training
    run's image IDs) as their count, first and last items; ``--json`` prints them whole."""
    return value if isinstance(value, str) else _shown_json(value, longest)


def _shown_json(value: Any, longest: int) -> str:
    if isinstance(value, list) and len(value) > longest:
        ends = [json.dumps(v, default=str) for v in (*value[:3], value[-1])]
        return f"[{len(value)} items: {', '.join(ends[:3])}, ..., {ends[3]}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_shown_json(v, longest)}" for k, v in value.items()) + "}"
    return json.dumps(value, default=str)


def cmd_predict(args: argparse.Namespace) -> int:
    segmenter = _segmenter(args, _existing_inputs(args.inputs))  # a bad model is reported before bad inputs
    files = _expand_inputs(args.inputs)
    out_dir = Path(args.out).expanduser()
    outputs = _output_paths(files, out_dir, args.save_prob)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise R2UNetError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
    from .predict import predict_file

    options = _predict_options(args, segmenter.checkpoint)
    print(_options_line(args, options, segmenter.tta), flush=True)  # stdout: stderr keeps one line per error
    notice = _log_once()
    for i, (path, (mask_path, prob_path)) in enumerate(zip(files, outputs), 1):
        with _progress(f"[{i}/{len(files)}] {path.name}") as bar:
            fraction = predict_file(segmenter, path, mask_path, prob_path, options, bar, notice=notice, log=_log)
        print(f"{path} -> {mask_path}  ({fraction:.1%} foreground)")
    return 0


def _evaluate_image(segmenter: Any, sample: Any, options: Any, pooled: Any, notice: Callable[[str], None],
                    progress: Callable[[float], None]) -> tuple[dict[str, float], Any]:
    """One image's metrics (AUC from the probabilities, the rest from the post-processed mask),
    added to ``pooled``; and its ground truth inside the field of view."""
    from .data import read_image_with_meta, read_mask
    from .predict import channel_notice, final_labels, options_for, predict_array

    image, meta = read_image_with_meta(sample.image)
    options = options_for(options, meta)
    mask = read_mask(sample.mask)
    fov = read_mask(sample.fov) if sample.fov else None
    probs = predict_array(segmenter, image, options, sample.image.name, progress)
    foreground = probs[..., 0, :, :]  # P(foreground): (H, W), or (Z, H, W) for a volume (metrics over all its voxels)
    if foreground.shape != mask.shape:
        raise R2UNetError(f"image {sample.image.name} is {tuple(foreground.shape)} pixels but its mask {sample.mask.name} is {mask.shape}; masks must match their images")
    metrics = pooled.add(foreground, mask, fov, predicted=final_labels(probs, options, binary=True))
    line = channel_notice(segmenter, image, options)
    if line:
        notice(line)
    return metrics, (mask[fov > 0] if fov is not None else mask)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import pair_files
    from .metrics import METRIC_NAMES, MetricAccumulator, mean_metrics

    samples = pair_files(args.images, args.masks, args.fov)
    segmenter = _segmenter(args, [sample.image for sample in samples])
    if segmenter.checkpoint.config.out_channels != 1:
        raise R2UNetError("evaluate computes binary metrics; this model is multi-class")
    options = _predict_options(args, segmenter.checkpoint)
    pooled = MetricAccumulator(threshold=options.threshold)
    per_image, notice = [], _log_once()
    if not args.json:
        print(_options_line(args, options, segmenter.tta), flush=True)
    for i, sample in enumerate(samples, 1):
        with _progress(f"[{i}/{len(samples)}] {sample.image.name}") as bar:
            metrics, inside = _evaluate_image(segmenter, sample, options, pooled, notice, bar)
        per_image.append({"id": sample.id, "image": str(sample.image), "metrics": metrics})
        if not args.json:
            print(f"{sample.id:<12} " + "  ".join(f"{k} {_fmt(metrics[k])}" for k in METRIC_NAMES), flush=True)
            if inside.size and (inside.min() == inside.max()):
                kind = "foreground" if inside.min() > 0 else "background"
                _log(f"note: the mask of {sample.id} is all {kind}, so some of its metrics are undefined (nan); the pooled ones still count its pixels")
    result, mean = pooled.pooled(), mean_metrics([p["metrics"] for p in per_image])
    if args.json:
        post = options.postprocess
        print(json.dumps({"model": args.model, "threshold": options.threshold, "fov": args.fov is not None, "tta": segmenter.tta, "scale": args.scale,
                          "postprocess": {"kind": post.kind, "count": post.count, "fill_holes": post.fill_holes},
                          "images": per_image, "mean": mean, "pooled": result, "confusion": pooled.confusion_dict()}, indent=2))
    else:
        print(f"{'mean':<12} " + "  ".join(f"{k} {_fmt(mean[k])}" for k in METRIC_NAMES) + "  (per image, nan left out)")
        print(f"{'pooled':<12} " + "  ".join(f"{k} {_fmt(result[k])}" for k in METRIC_NAMES) + "  (all pixels)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checked
    from .model_names import load_model

    checkpoint = load_model(args.model)
    if args.format == "bioimageio":
        from .bioimageio import export_package

        out = export_package(checkpoint, args.out, overwrite=args.overwrite)
        print(f"{out}: bioimage.io package (format 0.5) of {checkpoint.name}: rdf.yaml, TorchScript and ONNX weights "
              "(probabilities), test tensors, cover, README and the checkpoint; test it with 'bioimageio test'")
        return 0
    checkpoint.require_weights("export it")
    difference = export_checked(checkpoint, args.out, args.format, args.overwrite)
    print(f"{Path(args.out).expanduser()}: {args.format}, input (N, {checkpoint.config.in_channels}, H, W) float32 with H, W "
          f"multiples of {checkpoint.config.size_multiple}; max |logit difference| vs PyTorch {difference:.2g}")
    return 0


# -- parser ----------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from exc


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu (default: auto)")
    whole = math.isqrt(AUTO_WHOLE_IMAGE_PIXELS)
    p.add_argument("--tile", type=_positive_int, default=None, help=f"largest tile side in pixels; tiles are evened out (default: whole image up to {whole}^2 pixels if memory allows, else {AUTO_TILE})")
    p.add_argument("--overlap", type=float, default=None, help=f"overlap of neighbouring tiles, as a fraction of the largest tile, at most {MAX_OVERLAP:g} "
                   f"(default: {AUTO_OVERLAP_PIXELS} pixels, {AUTO_OVERLAP_PIXELS / AUTO_TILE:g} of {AUTO_TILE})")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="tiles per forward pass (default: 1 on the CPU, 4 on a GPU)")
    p.add_argument("--threshold", type=float, default=None, help=f"probability threshold for the mask (default: the model card's; {DEFAULT_THRESHOLD:g} for models without one)")
    p.add_argument("--no-postprocess", action="store_true", help="keep the thresholded mask as it is (default: the model card's post-processing, e.g. keep the largest component, fill holes)")
    p.add_argument("--scale", default="auto", metavar="auto|1|F",
                   help="auto: resize an image whose field of view differs by more than 10%% from the model's training images "
                        "to their scale (models whose card records one: the vessel models), probabilities resized back; "
                        "1: native resolution; F: resize by F (default: auto)")
    p.add_argument("--tta", action="store_true", default=None, help="test-time augmentation: average the 4 flips (4x slower, usually a little better; default: as the model card says)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation, even where the model card asks for it")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
                   help="auto: on the CPU, OpenVINO for bf16 and onnxruntime for fp32 when installed (about 3x and 2x faster "
                        "than PyTorch), else PyTorch (default: auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where the CPU has native bf16 (AMX, AVX-512 BF16), the model card validates it and OpenVINO "
                        "(or the compiled network, --compile) runs it, mixed precision on CUDA, else fp32 (default: auto)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the PyTorch network (CPU; 10-30 s per image shape, then bf16 forwards run 1.5-2x faster on CPUs with AMX): "
                        "auto compiles bf16 runs of 42 megapixels or more (128 DRIVE-sized images, one 6500^2 image) that OpenVINO "
                        "does not run, where a C++ compiler is installed (default: auto)")
    p.add_argument("--stack", action="store_true", help="treat a 3D (N, H, W) file with N <= 4 as a stack, not as channels")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="r2unet", description="U-Net / RU-Net / R2U-Net segmentation of medical images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list architectures and pretrained models", description="List the built-in architectures and the pretrained models with their metrics.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="architecture, parameters and FLOPs of a model", description="Show a model's architecture, config, parameter count and FLOPs per megapixel. Without MODEL: the four architectures side by side.")
    p.add_argument("model", nargs="*", metavar="MODEL", help="architecture name, pretrained name or checkpoint path")
    p.add_argument("--widths", type=_widths, default=None, help="override widths of an architecture, e.g. 16,32,64,128,256")
    p.add_argument("--t", type=int, default=None, help="override the recurrent steps t of an architecture")
    p.add_argument("--in-channels", type=_positive_int, default=None, help="override the input channels of an architecture")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="segment image files", description="Segment images; write OUT/<stem>.tif (uint8 mask 0/255, or class labels; thresholded and post-processed as the model card says; for a NIfTI input OUT/<stem>.nii.gz, a label volume with its affine) and optionally OUT/<stem>_prob.tif (float32). A model whose card's geometry is 'resize' sees each whole image letterboxed to its training size: --tile, --overlap and --batch-size have no effect there.")
    p.add_argument("model", metavar="MODEL", help="pretrained name or checkpoint path")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--save-prob", action="store_true", help="also write the probability map")
    _add_inference_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics against ground-truth masks", description="Predict every image and report SE, SP, ACC, F1 (Dice), Jaccard and AUC per image, their mean over images and pooled over all (FOV) pixels. AUC comes from the probabilities, the rest from the mask thresholded and post-processed as the model card says (see --threshold, --no-postprocess).")
    p.add_argument("model", metavar="MODEL", help="pretrained name or checkpoint path")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of ground-truth masks (paired by sample ID)")
    p.add_argument("--fov", default=None, help="folder of field-of-view masks (only pixels inside count)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_inference_options(p)
    p.set_defaults(func=cmd_evaluate)

    from .cli_train import add_training_parsers

    add_training_parsers(sub)

    p = sub.add_parser("export", help="write a model as ONNX, TorchScript or a bioimage.io package", description="Export a model's network (logits; input (N, C, H, W) float32 with H and W multiples of the model's size multiple, 16 by default) for use without this package, or (--format bioimageio) a BioImage Model Zoo package (.zip: rdf.yaml 0.5, TorchScript and ONNX weights giving probabilities, test tensors, cover, documentation, citations, licence, provenance) that deepImageJ, ilastik, bioimageio.core and 'r2unet predict PACKAGE.zip' run. The export is checked against PyTorch before it is kept.")
    p.add_argument("model", metavar="MODEL", help="pretrained name, fine-tuned version or checkpoint path")
    p.add_argument("--format", choices=["onnx", "torchscript", "bioimageio"], default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx, .pt, or .zip for bioimageio)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, (low, high) in (("overlap", (0.0, MAX_OVERLAP)), ("threshold", THRESHOLD_RANGE)):
        value = getattr(args, name, None)
        if value is not None and not low <= value <= high:
            parser.error(f"--{name} {value} is out of range ({low:g}..{high:g})")
    try:
        return int(args.func(args) or 0)
    except R2UNetError as exc:
        if args.debug:
            raise
        print(f"r2unet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("r2unet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: still one line, with the way to see more
        if args.debug:
            raise
        print(f"r2unet: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if _FROZE:  # a caller that runs main() again (the tests, a notebook) gets its collector back whole
            _FROZE.clear()
            gc.unfreeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
