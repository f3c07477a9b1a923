"""``r2unet train`` and ``r2unet finetune``: their parsers and the printing of the event stream.

The options' help texts and defaults come from :class:`~src_models.training.config.TrainConfig`
(each field's metadata) and :data:`~src_models.training.config.FINETUNE_DEFAULTS`; a fine-tune
run is assembled by :mod:`src_models.finetune`, as in the napari widget. Nothing heavy is
imported until a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cli import _log, _positive_int, _progress_bar, _widths
from .errors import R2UNetError
from .training.config import FINETUNE_DEFAULTS, FREEZE_CHOICES, OUTSIDE_FOV_WEIGHT, default, resolve_budget, setting
from .training.events import EventKind

_UNSET_WORDS = {"steps_per_epoch": "about one pass over the pixels", "patience": "never"}


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (``None``: not given, keep the default)."""
    return dict(
        patch_size=args.patch_size, batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch, lr=args.lr,
        val_fraction=args.val_fraction, val_ids=tuple(args.val_ids.split(",")) if args.val_ids else None,
        patience=args.patience, seed=args.seed, freeze=getattr(args, "freeze", None), keep_base=getattr(args, "keep_base", None),
        geometry=getattr(args, "geometry", None), rotate=args.rotate, scale=args.scale, aspect=args.aspect, rot90=args.rot90,
        zoom=args.zoom, gamma=args.gamma, colour=args.colour, blur=args.blur, jpeg=args.jpeg, l2sp=getattr(args, "l2sp", None),
        precision=args.precision, fn_weight=getattr(args, "fn_weight", None),
    )


def _zoom(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be two factors MIN,MAX such as 0.6,1.8") from None
    return low, high


def _given_budget(args: argparse.Namespace) -> tuple[int | None, float | None]:
    """``--epochs`` and ``--minutes`` as given (``None``: not given); a ``--resume`` that gives
    neither keeps the budget of the run it continues."""
    if args.resume and args.epochs is None and args.minutes is None:
        from .training.resume import saved_budget

        saved = saved_budget(Path(args.out))
        return saved["epochs"], saved["minutes"]
    return args.epochs, args.minutes


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _scores(metrics: Mapping[str, float] | None, names: tuple[str, ...] | None = ("F1", "AUC", "SE", "SP")) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items() if names is None or k in names)


def _print_event(event: Any, update: Any, close: Any) -> None:
    kind = event.kind
    if kind == EventKind.STEP:
        update(event.fraction)
    elif kind == EventKind.START:
        print(event.message, flush=True)
    elif kind == EventKind.BASELINE:
        print(f"{event.message}: {_scores(event.metrics)}", flush=True)
    elif kind == EventKind.EPOCH:
        eta = f"  eta {event.eta_s / 60:.1f} min" if event.eta_s is not None else ""
        note = f"  ({event.message})" if event.message else ""
        epoch = f"{event.epoch}/{event.epochs}" if event.epochs else f"{event.epoch} ({event.fraction:.0%} of the time budget)"
        print(f"epoch {epoch}  loss {event.loss:.4f}  {_scores(event.metrics)}  {event.elapsed_s:.0f} s{eta}{note}", flush=True)
    elif kind == EventKind.CHECKPOINT:
        print(f"  saved {event.path} ({event.message})", flush=True)
    elif kind.is_final:
        close()
        print(f"{event.message}; best checkpoint: {event.path}  {_scores(event.metrics, None)}", flush=True)


def _drive_training(trainer: Any) -> int:
    """Consume the engine's event stream: a progress bar on a terminal, one line per epoch.

    The first Ctrl-C asks the engine to stop after the current step (the best checkpoint and the
    resume state are kept); a second one interrupts at once.
    """
    import signal

    stop = {"asked": False}
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        _log("stopping after this step (Ctrl-C again to abort now)")

    signal.signal(signal.SIGINT, on_interrupt)
    update, close = _progress_bar("training")
    try:
        for event in trainer.run(should_stop=lambda: stop["asked"]):
            _print_event(event, update, close)
    finally:
        close()
        signal.signal(signal.SIGINT, previous)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .data import pair_files, read_image
    from .nets import ModelConfig
    from .preprocessing import PreprocessConfig
    from .training import TrainConfig, Trainer, load_samples
    from .training.distributed import leave_group

    _set_threads(args)
    preprocess = PreprocessConfig(channels=args.channels)
    first = read_image(pair_files(args.images)[0].image)
    image_channels = 1 if first.ndim == 2 else min(first.shape[-1], first.shape[0])
    try:
        model_config = ModelConfig(arch=args.arch, in_channels=preprocess.out_channels(image_channels), out_channels=args.classes,
                                   widths=args.widths or ModelConfig().widths, t=args.t, norm=args.norm)
    except ValueError as exc:
        raise R2UNetError(str(exc)) from exc
    samples = load_samples(args.images, args.masks, args.fov, preprocess, classes=args.classes)
    settings = {k: v for k, v in _train_settings(args).items() if v is not None}
    config = TrainConfig(**settings, **resolve_budget(*_given_budget(args)))
    provenance = {"name": args.name or Path(args.out).stem, "description": args.description or f"{args.arch} trained on {Path(args.images).resolve()}"}
    base = _init_model(args.init, model_config, preprocess) if args.init else None
    # the card says what the new model is: the start's (its metrics cleared), the card options over it
    card = _card(args, base.model_card.with_(metrics={}, metrics_on="", bf16=False) if base is not None else None)
    trainer = Trainer(model_config, preprocess, samples, config, args.out, base=base,
                      class_names=[args.class_name] if args.classes == 1 else None, provenance=provenance, card=card,
                      device=args.device, resume=args.resume, overwrite=args.overwrite)
    code = _drive_training(trainer)
    leave_group(trainer.dist)  # under torchrun: every rank leaves the group together, for a clean exit
    return code


def _training_scale(text: str, images: str) -> Any:
    """``--fov-diameter``: ``auto`` (the median over the training images) or a diameter in pixels."""
    from .data import pair_files, read_image
    from .preprocessing import to_chw
    from .scale import Scale, median_fov_diameter

    if text.strip().lower() == "auto":
        diameter = median_fov_diameter([to_chw(read_image(p.image)) for p in pair_files(images)])
        if diameter is None:
            raise R2UNetError(f"no field of view (a bright disc on a dark border) found in the images of {images}; give --fov-diameter PIXELS")
        _log(f"training images: field of view {diameter:.0f} px across (median)")
    else:
        try:
            diameter = float(text)
        except ValueError:
            raise R2UNetError(f"--fov-diameter {text!r} must be 'auto' or a number of pixels") from None
    try:
        return Scale("fov_diameter", diameter)
    except ValueError as exc:
        raise R2UNetError(f"--fov-diameter: {exc}") from exc


def _init_model(spec: str, model_config: Any, preprocess: Any) -> Any:
    """The checkpoint ``--init`` starts from (read only), checked to be the model the options describe."""
    from .model_names import load_model

    base = load_model(spec)
    base.require_weights("train from it (--init)")
    mine, theirs = model_config.to_dict(), base.config.to_dict()
    differ = [f"{k} {theirs.get(k)!r} (options: {v!r})" for k, v in mine.items() if theirs.get(k) != v]
    if base.preprocess.channels != preprocess.channels:
        differ.append(f"channels {base.preprocess.channels!r} (options: {preprocess.channels!r})")
    if differ:
        raise R2UNetError(f"--init {spec} is another model: " + ", ".join(differ) + "; give the architecture options it was built with")
    return base


def _card(args: argparse.Namespace, start: Any = None) -> Any:
    """The model card of a new model: ``--card`` JSON, else ``start`` (the ``--init`` model's), then the
    card options over it, each changing only what it names (None if there is no card to start from and
    no option is given). A new ``--data`` without ``--data-short`` drops the start's short name (it
    named the old data)."""
    from .model_card import ModelCard

    try:
        first = ModelCard.from_json(Path(args.card).read_text(encoding="utf-8")) if args.card is not None else start
    except OSError as exc:
        raise R2UNetError(f"cannot read the card {args.card}: {exc.strerror or exc}; check the path") from exc
    except ValueError as exc:
        raise R2UNetError(f"invalid model card: {exc}") from exc
    given = {k: getattr(args, k) for k in ("task", "modality", "data", "data_short", "licence", "threshold") if getattr(args, k) is not None}
    if args.card_channels is not None:
        given["channels"] = args.card_channels
    if args.keep_components is not None or args.fill_holes:
        given["postprocess"] = _postprocess(args, (first or ModelCard()).postprocess)
    if args.card_tta is not None:
        given["tta"] = args.card_tta
    if args.fov_diameter is not None:
        given["scale"] = _training_scale(args.fov_diameter, args.images)
    if "data" in given and "data_short" not in given:
        given["data_short"] = ""
    if not given:
        return first
    try:
        return (first or ModelCard()).with_(**given)
    except ValueError as exc:
        raise R2UNetError(f"invalid model card: {exc}") from exc


def _postprocess(args: argparse.Namespace, before: Any) -> Any:
    """``--keep-components`` and ``--fill-holes`` over the card's post-processing ``before``: what
    is not given stays as it was."""
    import dataclasses

    from .model_card import Postprocess

    if args.keep_components is None:  # --fill-holes alone: the components rule stays
        return dataclasses.replace(before, fill_holes=True)
    count = args.keep_components
    kind = "none" if count == 0 else "largest_component" if count == 1 else "largest_components"
    return Postprocess(kind, max(1, count), bool(args.fill_holes) or before.fill_holes)


def _add_card_options(p: argparse.ArgumentParser) -> None:
    card = p.add_argument_group("model card (what the model is for; shown by r2unet models/info and in napari)")
    card.add_argument("--card", default=None, metavar="JSON", help="a model card JSON file to start from (the options below override it)")
    card.add_argument("--task", default=None, help="task, e.g. 'skin lesion'")
    card.add_argument("--modality", default=None, help="imaging modality, e.g. 'dermoscopy (RGB photograph)'")
    card.add_argument("--data", default=None, help="training data, e.g. 'ISIC 2017 train (2000 images)'")
    card.add_argument("--data-short", default=None, help="a short name of the data for menus, e.g. 'ISIC 2017' (default: --data up to its first '(' or ',')")
    card.add_argument("--licence", default=None, help="licence or terms of the weights and data")
    card.add_argument("--card-channels", default=None, help="input channels and colour handling, in words")
    card.add_argument("--threshold", type=float, default=None, help="default threshold of the probability map (default: 0.5)")
    card.add_argument("--keep-components", type=int, default=None, metavar="N", help="post-processing: keep the N largest connected components (0 = all)")
    card.add_argument("--fill-holes", action="store_true", help="post-processing: fill holes in the mask")
    card.add_argument("--card-tta", action="store_true", default=None, help="the card asks for test-time augmentation (the mean of the 4 flips) at inference")
    card.add_argument("--no-card-tta", dest="card_tta", action="store_false", help="the card does not ask for test-time augmentation (over an --init model's card)")
    card.add_argument("--fov-diameter", default=None, metavar="auto|PX", help="the training images' field-of-view diameter in pixels, for --scale auto at inference ('auto': measured on the training images)")


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneRequest, build_trainer, file_pairs
    from .model_names import load_model

    _set_threads(args)
    base = load_model(args.model)
    epochs, minutes = _given_budget(args)
    request = FinetuneRequest(
        base=base, pairs=[], out=Path(args.out), name=args.name or Path(args.out).stem, epochs=epochs,
        minutes=minutes, device=args.device, settings=_train_settings(args), resume=args.resume, overwrite=args.overwrite,
        description=args.description or f"{base.name} fine-tuned on {Path(args.images).resolve()}",
    )
    request.config()  # bad settings are refused before any image is read
    request.pairs = file_pairs(args.images, args.masks, args.fov, args.corrections, classes=base.config.out_channels)
    return _drive_training(build_trainer(request))


# -- parsers ---------------------------------------------------------------------------------
def _help(name: str, defaults: Mapping[str, Any], text: str = "") -> str:
    """``name``'s help from TrainConfig (or ``text``), with its default in ``defaults`` or TrainConfig."""
    value = defaults.get(name, default(name))
    shown = _UNSET_WORDS.get(name) if value in (None, 0) and name in _UNSET_WORDS else f"{value:g}" if isinstance(value, float) else value
    return f"{text or setting(name)['help']} (default: {shown})"


def _add_training_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--masks", required=True, help="folder of masks, paired with the images by sample ID")
    p.add_argument("--fov", default=None, help=f"folder of field-of-view masks (validation counts only inside; loss weight {OUTSIDE_FOV_WEIGHT:g} outside)")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")


def _add_training_options(p: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    epochs = defaults.get("epochs", default("epochs"))
    budget = p.add_argument_group("budget", (
        f"--minutes alone: train that long, with no epoch limit (the learning rate decays with the clock); "
        f"--epochs alone: that many epochs, with no time limit; both: whichever ends first; neither: {epochs} epochs (with --resume: the saved run's budget). "
        "--patience may stop a run earlier; its last line says at which epoch it stopped and why."))
    budget.add_argument("--epochs", type=_positive_int, default=None, help=f"epoch limit (default: {epochs} when --minutes is not given either)")
    budget.add_argument("--minutes", type=float, default=None, metavar="N",
                        help="time budget in minutes of wall clock (validation included; checked before each step, "
                             "the partial last epoch is validated too) (default: none)")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None, help=_help("steps_per_epoch", defaults, "optimizer steps per epoch"))
    p.add_argument("--patch-size", type=_positive_int, default=None, help=_help("patch_size", defaults))
    p.add_argument("--batch-size", type=_positive_int, default=None, help=_help("batch_size", defaults))
    p.add_argument("--lr", type=float, default=None, help=_help("lr", defaults))
    p.add_argument("--val-fraction", type=float, default=None, help=_help("val_fraction", defaults))
    p.add_argument("--val-ids", default=None, help="comma-separated sample IDs to hold out instead")
    p.add_argument("--patience", type=int, default=None, help=_help("patience", defaults, "stop after this many epochs without improvement"))
    p.add_argument("--seed", type=int, default=None, help=_help("seed", defaults))
    p.add_argument("--l2sp", type=float, default=None, help=_help("l2sp", defaults))
    p.add_argument("--fn-weight", type=float, default=None, help=_help("fn_weight", defaults))
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--rotate", type=float, default=None, help=_help("rotate", defaults))
    aug.add_argument("--scale", type=float, default=None, help=_help("scale", defaults))
    aug.add_argument("--aspect", type=float, default=None, help=_help("aspect", defaults))
    aug.add_argument("--zoom", type=_zoom, default=None, metavar="MIN,MAX", help=setting("zoom")["help"] + " (default: off)")
    aug.add_argument("--gamma", type=float, default=None, help=_help("gamma", defaults))
    aug.add_argument("--blur", type=float, default=None, help=_help("blur", defaults))
    aug.add_argument("--colour", type=float, default=None, help=_help("colour", defaults))
    aug.add_argument("--jpeg", type=int, default=None, help=_help("jpeg", defaults))
    aug.add_argument("--no-rot90", dest="rot90", action="store_const", const=False, default=None, help="no 90-degree rotations or vertical flips (upright images such as chest X-rays)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu); under torchrun each process takes its own GPU")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"], help=_help("precision", defaults))
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's .resume.pt (the same settings; --epochs/--minutes/--patience may change, giving neither keeps the saved budget)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT and its resume state (default: refuse)")
    p.add_argument("--name", default=None, help="model name stored in the checkpoint (default: OUT's stem)")
    p.add_argument("--description", default=None, help="one-line description stored in the checkpoint")


def add_training_parsers(sub: Any) -> None:
    """Register ``train`` and ``finetune`` on the ``r2unet`` subparsers ``sub``."""
    from .architectures import ARCHITECTURES

    p = sub.add_parser("train", help="train a model from image/mask folders", description="Train a new model on paired images and masks. Writes OUT (the best checkpoint), OUT's .resume.pt (for --resume) and .history.json. Works under torchrun for several processes/GPUs/nodes.")
    p.add_argument("arch", choices=list(ARCHITECTURES), help="architecture")
    _add_training_data_options(p)
    p.add_argument("--widths", type=_widths, default=None, help="channels per level (default: 16,32,64,128,256)")
    p.add_argument("--t", type=int, default=2, help="recurrent steps (default: 2, the paper's)")
    p.add_argument("--norm", default="batch", choices=["batch", "instance", "group", "none"], help="normalisation (default: batch)")
    p.add_argument("--channels", default="green", choices=["green", "gray", "rgb", "all"], help="input channels (default: green, for fundus images)")
    p.add_argument("--classes", type=_positive_int, default=1, help="1 = binary (sigmoid), >= 2 = multi-class labels (default: 1)")
    p.add_argument("--class-name", default="vessel", help="name of the foreground class of a binary model (default: vessel)")
    p.add_argument("--geometry", default=None, choices=["tiled", "resize"], help=_help("geometry", {}))
    p.add_argument("--init", default=None, metavar="MODEL", help="start from this model's weights (a pretrained name or a checkpoint; it is only read) with a new schedule; the architecture options must match it")
    _add_training_options(p, {})
    _add_card_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a model on a few corrected images", description="Fine-tune MODEL on (image, corrected mask) pairs into a NEW checkpoint OUT whose metadata records its parent; the base model file is never modified.")
    p.add_argument("model", metavar="MODEL", help="pretrained name or checkpoint path")
    _add_training_data_options(p)
    p.add_argument("--corrections", default=None, help=f"folder of masks marking the pixels the user corrected (loss weight {default('correction_weight'):g}x)")
    p.add_argument("--freeze", default=None, choices=list(FREEZE_CHOICES), help=_help("freeze", FINETUNE_DEFAULTS))
    p.add_argument("--allow-worse", dest="keep_base", action="store_const", const=False, default=None,
                   help="keep the best fine-tuned epoch even when the base model scores higher on the validation images (default: the base is the epoch to beat)")
    _add_training_options(p, FINETUNE_DEFAULTS)
    p.set_defaults(func=cmd_finetune)
