"""bioimage.io model packages (the BioImage Model Zoo's format, spec 0.5): out and in.

Out: :func:`export_package` (``r2unet export MODEL --format bioimageio --out NAME.zip``) writes a
zip with an ``rdf.yaml`` (format 0.5), TorchScript and ONNX weights of the network *with its
input channel choice and its sigmoid/softmax inside* (so a consumer gets probabilities), a test
input (a synthetic image made here, never a shared dataset's) and the test output our own
pipeline gives for it, a cover made from the two, a README (task, data, licence, metrics,
provenance, what the spec cannot say) and the napari-r2unet checkpoint itself as an attachment.
The model card maps onto the spec like this:

- percentile normalisation -> ``scale_range`` over ``(y, x)`` (per channel, per image) with the
  card's percentiles, then ``clip`` to [-1, 2]: exactly our :func:`~src_models.preprocessing.normalize_tile`
  for images up to 4 million pixels (larger ones: we measure the percentiles on a strided
  subsample, a consumer on every pixel);
- a green-channel model takes RGB (the network picks the green channel itself, after the
  per-channel normalisation, which is the same thing); a gray model takes one channel;
- ``tiled`` geometry -> any size that is a multiple of the network's 16 (``min``/``step``), with a
  halo a tiling consumer should drop; ``resize`` geometry -> a fixed ``size x size`` input: the
  consumer must letterbox (aspect kept, edge-padded) and resize the probabilities back, which the
  spec has no step for (the README says so);
- test-time augmentation and the card's post-processing (largest components, filled holes) have
  no spec steps either: the README names them; the test output is the plain network's.

In: :func:`load_package` reads a package (``.zip``, or a folder's ``rdf.yaml``/``bioimageio.yaml``)
without extracting it and without running any code from it. One of ours (its ``config`` names
the checkpoint attachment and the SHA-256 matches) comes back as that checkpoint, so it segments,
fine-tunes and re-exports exactly as before. Any other package of a 2D network with one input
and a single-class output (ONNX weights, else TorchScript) comes back as a prediction-only
:class:`~src_models.checkpoint.Checkpoint` whose ``package`` is a :class:`Package`: the
:class:`~src_models.inference.Segmenter` runs it with the package's own pre- and post-processing
and our tiler. What we cannot run (3D, several inputs, multi-class outputs, Keras/TensorFlow or
state-dict-only weights) is refused with a one-line reason.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import R2UNetError

FORMAT_VERSION = "0.5.4"  # what deepImageJ, ilastik and bioimageio.core all read
CONFIG_KEY = "napari-r2unet"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
PACKAGE_SUFFIXES = (".zip",)
INPUT_ID, OUTPUT_ID = "raw", "probability"
TEST_SIDE = 256  # the test input of a tiled model: TEST_SIDE x TEST_SIDE pixels
MIN_SIDE, HALO = 128, 32  # a tiled model's smallest input (a multiple of 16) and the halo a tiler should drop
MAX_RDF_BYTES = 1 << 20
MAX_MEMBER_BYTES = 1 << 30  # one file in a package (weights are a few MB; a zip bomb is not read)
CLIP = (-1.0, 2.0)  # preprocessing.normalize_tile's clip of percentile-normalised values
PACKAGE_TOLERANCE = 1e-4  # exported ONNX / TorchScript probabilities against PyTorch's

ALOM_2018 = {"text": "Alom MZ, Hasan M, Yakopcic C, Taha TM, Asari VK. Recurrent Residual Convolutional Neural Network "
                     "based on U-Net (R2U-Net) for Medical Image Segmentation. arXiv:1802.06955, 2018.",
             "doi": "10.48550/arXiv.1802.06955"}
RONNEBERGER_2015 = {"text": "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image "
                            "Segmentation. MICCAI 2015.", "doi": "10.1007/978-3-319-24574-4_28"}
DATA_CITATIONS = (  # (a word the card's data names, its citation)
    ("DRIVE", {"text": "Staal J, Abramoff MD, Niemeijer M, Viergever MA, van Ginneken B. Ridge-based vessel segmentation "
                       "in color images of the retina (DRIVE). IEEE TMI 23(4), 2004.", "doi": "10.1109/TMI.2004.825627"}),
    ("ISIC 2017", {"text": "Codella NCF et al. Skin lesion analysis toward melanoma detection: a challenge at the 2017 ISBI, "
                           "hosted by the International Skin Imaging Collaboration (ISIC). ISBI 2018.",
                   "doi": "10.1109/ISBI.2018.8363547"}),
    ("CXR-Lungs", {"text": "Chest X-ray lung fields: a public teaching collection redistributed with lung masks by the "
                           "OpenIST project (no licence stated: research use only).",
                   "url": "https://github.com/IlyaOvodov/OpenIST"}),
)
SPDX_IDS = ("BSD-3-Clause", "BSD-2-Clause", "MIT", "Apache-2.0", "CC-BY-4.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0", "CC0-1.0", "GPL-3.0")
PROJECT_LICENCE = "BSD-3-Clause"
Log = Callable[[str], None]


def is_package(spec: str | os.PathLike[str]) -> bool:
    """Whether ``spec`` names a bioimage.io package: a ``.zip`` file or an ``rdf.yaml``/``bioimageio.yaml``."""
    path = Path(spec)
    return path.suffix.lower() in PACKAGE_SUFFIXES or path.name in RDF_NAMES


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency
        raise R2UNetError("bioimage.io packages need PyYAML; pip install pyyaml") from exc
    return yaml


# -- out -------------------------------------------------------------------------------------------
def _packaged_network(checkpoint: Any) -> Any:
    """The network as a package runs it: (N, C, H, W) normalised input -> probabilities."""
    import torch

    from .nets import logits_to_probabilities

    class Packaged(torch.nn.Module):
        def __init__(self, net: torch.nn.Module, pick: int | None) -> None:
            super().__init__()
            self.net, self.pick = net, pick

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.pick is not None:
                x = x[:, self.pick:self.pick + 1]
            return logits_to_probabilities(self.net(x))

    pick = 1 if checkpoint.preprocess.channels == "green" else None
    return Packaged(checkpoint.build("cpu"), pick).eval()


def package_channels(checkpoint: Any) -> list[str]:
    """The channel names of a package's input: RGB for green and rgb models, one for gray ones."""
    mode, n = checkpoint.preprocess.channels, checkpoint.config.in_channels
    if mode in ("green", "rgb"):
        return ["R", "G", "B"]
    if mode == "gray":
        return ["gray"]
    return [f"channel{i}" for i in range(n)]


def _test_image(checkpoint: Any, side: int) -> np.ndarray:
    """A synthetic raw test input, (1, C, side, side) float32 in 0..255: vessels for a tiled model,
    a dark blob (a "lesion" or two "lungs") for a resize one. Made here: no dataset's image."""
    from .synthetic import vessel_image

    channels = len(package_channels(checkpoint))
    if checkpoint.model_card.geometry.kind == "tiled":
        image, _ = vessel_image((side, side), n_vessels=8, seed=17, rgb=channels == 3)
        chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    else:
        rng = np.random.default_rng(17)
        yy, xx = np.mgrid[0:side, 0:side] / side
        blob = np.exp(-(((yy - 0.5) / 0.28) ** 2 + ((xx - 0.45) / 0.22) ** 2) ** 2)
        base = np.array([205.0, 160.0, 140.0])[:, None, None] if channels == 3 else np.array([170.0])[:, None, None]
        chw = base * (1 - 0.55 * blob) + rng.normal(0, 6, (channels, side, side))
    chw = np.repeat(chw[:1], channels, axis=0) if chw.shape[0] != channels else chw
    return np.clip(chw, 0, 255).astype(np.float32)[None]


def _cover(test_input: np.ndarray, test_output: np.ndarray, path: Path) -> None:
    """A 2:1 PNG: the test input beside its probability map (made from the test tensors)."""
    from PIL import Image

    raw = test_input[0]
    low, high = np.percentile(raw, [1, 99])
    shown = np.clip((raw - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(shown, 3, axis=0) if shown.shape[0] == 1 else shown[:3]
    prob = test_output[0, -1]
    heat = np.stack([prob, prob * 0.8, 1 - prob])  # blue (0) to orange-yellow (1)
    both = np.concatenate([rgb, heat], axis=2).transpose(1, 2, 0)
    Image.fromarray((both * 255).round().astype(np.uint8)).resize((512, 256), Image.Resampling.BILINEAR).save(path)


def _licence_id(text: str) -> str:
    for spdx in SPDX_IDS:
        if spdx.lower() in text.lower():
            return spdx
    return PROJECT_LICENCE


def _data_citations(card: Any) -> list[dict[str, str]]:
    words = f"{card.data} {card.data_short}"
    return [dict(cite) for word, cite in DATA_CITATIONS if word.lower() in words.lower()]


def _rdf_name(name: str) -> str:
    """The spec's name: 5 to 128 characters of letters, digits and ``_+- ().``."""
    cleaned = re.sub(r"\s+", " ", re.sub(r"[^A-Za-z0-9_+\- ().]", " ", name)).strip()[:110]
    return cleaned if len(cleaned) >= 5 else f"{cleaned} (napari-r2unet)".strip()


def _axes(checkpoint: Any, side: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input and output axes: any multiple of the size multiple (tiled) or a fixed side (resize)."""
    m = checkpoint.config.size_multiple
    if side is None:
        size: Any = {"min": max(m, MIN_SIDE // m * m), "step": m}
        halo = {"halo": HALO}
    else:
        size, halo = side, {}
    inputs = [{"type": "batch"}, {"type": "channel", "channel_names": package_channels(checkpoint)},
              {"type": "space", "id": "y", "size": size}, {"type": "space", "id": "x", "size": size}]
    outputs = [{"type": "batch"}, {"type": "channel", "channel_names": list(checkpoint.class_names)}]
    outputs += [{"type": "space", "id": a, "size": {"tensor_id": INPUT_ID, "axis_id": a}, **halo} for a in ("y", "x")]
    return inputs, outputs


def package_preprocessing(checkpoint: Any) -> list[dict[str, Any]]:
    """The card's normalisation as spec 0.5 preprocessing steps (percentile: scale_range + clip)."""
    config = checkpoint.preprocess
    if config.normalize != "percentile":
        raise R2UNetError(f"{checkpoint.name} normalises with {config.normalize!r}, which bioimage.io's steps cannot express "
                          "(only percentile models export); retrain with the default percentile normalisation")
    return [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": float(config.low),
                                              "max_percentile": float(config.high)}},
            {"id": "clip", "kwargs": {"min": CLIP[0], "max": CLIP[1]}}]


def _documentation(checkpoint: Any, side: int | None, rdf: dict[str, Any]) -> str:
    card, prov = checkpoint.model_card, checkpoint.provenance
    arch = {"r2unet": "R2U-Net", "runet": "RU-Net", "resunet": "ResU-Net", "unet": "U-Net"}[checkpoint.config.arch]
    lines = [f"# {rdf['name']}", "", rdf["description"], "",
             f"{arch} (widths {list(checkpoint.config.widths)}, t={checkpoint.config.t}) exported by napari-r2unet "
             f"{_version()} from the checkpoint {checkpoint.name} (SHA-256 {checkpoint.sha256 or 'not saved'}).", "",
             "## Model card", ""]
    for key, value in _card_items(card):
        lines.append(f"- {key}: {value}")
    lines += ["", "## Running it", "",
              f"Input `{INPUT_ID}`: a 2D image, axes (batch, channel, y, x), channels {package_channels(checkpoint)}, any "
              "value range (it is normalised per channel: the 1st-99th percentiles map to 0..1, clipped to [-1, 2])."]
    if checkpoint.preprocess.channels == "green":
        lines.append("The network reads the green channel of the normalised RGB input (a gray image: give it as 3 equal channels).")
    if side is None:
        lines.append(f"Any height and width that are multiples of {checkpoint.config.size_multiple} (at least "
                     f"{rdf['inputs'][0]['axes'][2]['size']['min']}); tile larger images and drop a halo of {HALO} pixels.")
    else:
        lines.append(f"A fixed {side} x {side} input: this model sees the WHOLE image resized to {card.geometry.size} px with its "
                     f"aspect ratio kept (centred, edge-padded after normalisation, then to {side}), and its probabilities are resized "
                     "back. The bioimage.io spec has no letterbox step: a consumer must do this itself; tiling a large "
                     "image into pieces of this size gives wrong results.")
    lines += [f"Output `{OUTPUT_ID}`: the probability of {', '.join(checkpoint.class_names)} per pixel "
              f"({'sigmoid' if checkpoint.config.out_channels == 1 else 'softmax over the classes'}, inside the network); "
              f"the card's threshold is {card.threshold:g}.", ""]
    missing = []
    if card.tta:
        missing.append("test-time augmentation (napari-r2unet averages the 4 flips of the image; the test output is the plain network's)")
    if card.postprocess.kind != "none" or card.postprocess.fill_holes:
        missing.append(f"post-processing of the thresholded mask: {card.postprocess.describe()}")
    if missing:
        lines += ["Not expressible in the spec, applied by napari-r2unet and to be done by other consumers:", ""]
        lines += [f"- {item}" for item in missing] + [""]
    lines += ["napari-r2unet itself reads this package back as the original model (the checkpoint attachment): "
              "`r2unet predict THIS.zip IMAGE --out DIR`.", "", "## Validation", "",
              f"Before writing, the TorchScript and ONNX networks were each run on the test input and agreed with PyTorch "
              f"to {PACKAGE_TOLERANCE:g}, and the preprocessing steps above, applied to the test input, reproduced "
              "napari-r2unet's normalisation. The test input is a synthetic image made by napari-r2unet (no patient data); "
              "the model's measured quality is under Model card (metrics) and comes from its own test set.", "",
              "## Provenance", ""]
    for key in ("description", "parent_name", "parent_sha256", "data", "epochs", "created", "metrics", "images"):
        if prov.get(key) not in (None, "", [], {}):
            value = prov[key]
            shown = f"{len(value)} items" if isinstance(value, list) and len(value) > 6 else json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"- {key}: {shown}")
    lines += ["", "## Licence and terms", "", f"{card.licence or 'weights: ' + PROJECT_LICENCE + ' (this project)'}", "",
              "## Citations", ""] + [f"- {c['text']} {c.get('doi', c.get('url', ''))}" for c in rdf["cite"]]
    return "\n".join(lines) + "\n"


def _card_items(card: Any) -> list[tuple[str, str]]:
    items = [("task", card.task), ("modality", card.modality), ("training data", card.data), ("licence", card.licence),
             ("channels", card.channels), ("geometry", card.geometry.describe()), ("threshold", f"{card.threshold:g}"),
             ("post-processing", card.postprocess.describe()), ("test-time augmentation", "on" if card.tta else "off")]
    if card.metrics:
        items.append(("metrics", ", ".join(f"{k} {v:.4f}" for k, v in card.metrics.items()) + (f" ({card.metrics_on})" if card.metrics_on else "")))
    return [(k, v) for k, v in items if v]


def _version() -> str:
    from . import __version__

    return __version__


def _write_weights(checkpoint: Any, folder: Path, example: np.ndarray) -> tuple[np.ndarray, dict[str, Path]]:
    """TorchScript and ONNX of the packaged network, each checked on ``example``; returns its output too."""
    import torch

    from .export import _run_exported, export_onnx, export_torchscript

    net = _packaged_network(checkpoint)
    x = torch.from_numpy(example)
    with torch.inference_mode():
        reference = net(x).numpy()
    files = {"torchscript": export_torchscript(checkpoint, folder / "weights_torchscript.pt", module=net, example=x),
             "onnx": export_onnx(checkpoint, folder / "weights.onnx", module=net, example=x, output_name="probabilities")}
    for fmt, path in files.items():
        difference = float(np.abs(_run_exported(path, fmt, x) - reference).max())
        if not difference < PACKAGE_TOLERANCE:
            raise R2UNetError(f"the exported {fmt} network differs from PyTorch by {difference:.2g}; package not written")
    return reference, files


def _rdf(checkpoint: Any, files: dict[str, Path], side: int | None, attachment: Path) -> dict[str, Any]:
    import torch

    card, prov = checkpoint.model_card, checkpoint.provenance
    digest = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    digest["checkpoint"] = hashlib.sha256(attachment.read_bytes()).hexdigest()
    inputs, outputs = _axes(checkpoint, side)
    cites = [dict(ALOM_2018)] + ([dict(RONNEBERGER_2015)] if checkpoint.config.arch == "unet" else []) + _data_citations(card)
    what = card.task or ", ".join(checkpoint.class_names)
    description = str(prov.get("description") or f"{checkpoint.config.arch} for {what} segmentation")
    if prov.get("parent_sha256"):
        description += f" (fine-tuned from {prov.get('parent_name') or prov['parent_sha256'][:12]})"
    tags = ["segmentation", "2d", "pytorch", "onnx", "torchscript", "napari-r2unet", checkpoint.config.arch]
    tags += [w for w in (card.task, card.modality.split(" (")[0]) if w]
    created = str(prov.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": _rdf_name(checkpoint.name),
        "description": description[:1024],
        "authors": [{"name": "napari-r2unet developers"}],
        "cite": cites,
        "license": _licence_id(card.licence),
        "documentation": "README.md",
        "covers": ["cover.png"],
        "tags": list(dict.fromkeys(t.lower() for t in tags)),
        "timestamp": created,
        "inputs": [{"id": INPUT_ID, "description": card.channels or f"{len(package_channels(checkpoint))}-channel image",
                    "axes": inputs, "test_tensor": {"source": "test_input.npy", "sha256": digest["test_input"]},
                    "data": {"type": "float32"}, "preprocessing": package_preprocessing(checkpoint)}],
        "outputs": [{"id": OUTPUT_ID, "description": f"probability of {', '.join(checkpoint.class_names)}",
                     "axes": outputs, "test_tensor": {"source": "test_output.npy", "sha256": digest["test_output"]},
                     "data": {"type": "float32", "range": [0.0, 1.0]}}],
        "weights": {
            "torchscript": {"source": "weights_torchscript.pt", "sha256": digest["torchscript"],
                            "pytorch_version": torch.__version__.split("+")[0]},
            "onnx": {"source": "weights.onnx", "sha256": digest["onnx"], "opset_version": _opset(), "parent": "torchscript"},
        },
        "attachments": [{"source": attachment.name, "sha256": digest["checkpoint"]}],
        "config": {CONFIG_KEY: {"checkpoint": attachment.name, "checkpoint_sha256": digest["checkpoint"],
                                "package_version": _version(), "card": card.to_dict(),
                                "preprocess": checkpoint.preprocess.to_dict(),
                                "parent_sha256": prov.get("parent_sha256"), "source_sha256": checkpoint.sha256}},
    }


def _opset() -> int:
    from .export import OPSET

    return OPSET


def export_package(model: Any, out: str | os.PathLike[str], *, overwrite: bool = False, log: Log | None = None) -> Path:
    """Write ``model`` (a :class:`~src_models.checkpoint.Checkpoint`, a name or a path) as the
    bioimage.io package ``out`` (.zip), atomically; returns ``out``. The ONNX and TorchScript
    networks are each checked against PyTorch on the test input before anything is written."""
    from .checkpoint import Checkpoint, save_checkpoint
    from .export import _check_target
    from .fileio import atomic_write
    from .preprocessing import measure_stats, normalize_tile

    log = log or (lambda message: None)
    if isinstance(model, Checkpoint):
        checkpoint = model
    else:
        from .model_names import load_model

        checkpoint = load_model(str(model))
    if checkpoint.package is not None:
        raise R2UNetError(f"{checkpoint.name} is a bioimage.io package already (not a napari-r2unet model); share the package itself")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise R2UNetError(f"a bioimage.io package is a .zip file; name the output {out.with_suffix('.zip').name}")
    if out.exists() and not overwrite:
        raise R2UNetError(f"{out} already exists; choose another name or replace it (--overwrite)")
    _check_target(checkpoint, out, overwrite)
    card = checkpoint.model_card
    side = None if card.geometry.kind == "tiled" else int(math.ceil(card.geometry.size / checkpoint.config.size_multiple)
                                                         * checkpoint.config.size_multiple)
    package_preprocessing(checkpoint)  # refuses what cannot be expressed before any work
    raw = _test_image(checkpoint, side or TEST_SIDE)
    pre_config = _package_preprocess_config(checkpoint)
    normalised = normalize_tile(raw[0], measure_stats(raw[0], pre_config), pre_config)[None]
    with tempfile.TemporaryDirectory(prefix=".r2unet-package-", dir=out.parent) as tmp:
        folder = Path(tmp)
        log(f"exporting {checkpoint.name}: TorchScript and ONNX")
        try:
            test_output, weights = _write_weights(checkpoint, folder, np.ascontiguousarray(normalised, dtype=np.float32))
        except R2UNetError:
            raise
        except Exception as exc:
            raise R2UNetError(f"cannot export {checkpoint.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        consumer = _fit_steps(package_preprocessing(checkpoint), raw[0], ["c", "y", "x"])(raw[0])
        if not np.abs(consumer - normalised[0]).max() < PACKAGE_TOLERANCE:  # the spec's steps reproduce ours on the test input
            raise R2UNetError("the package's preprocessing steps do not reproduce the model's normalisation; not written")
        np.save(folder / "test_input.npy", raw)
        np.save(folder / "test_output.npy", test_output.astype(np.float32))
        _cover(raw, test_output, folder / "cover.png")
        attachment = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', checkpoint.name)}.safetensors"
        if checkpoint.path is not None and checkpoint.path.suffix == ".safetensors" and checkpoint.path.is_file():
            shutil.copyfile(checkpoint.path, attachment)  # the very file: its SHA-256 keeps the lineage
        else:
            save_checkpoint(attachment, checkpoint.state_dict, checkpoint.config, checkpoint.preprocess,
                            checkpoint.class_names, checkpoint.provenance, checkpoint.card)
        files = {"test_input": folder / "test_input.npy", "test_output": folder / "test_output.npy", **weights}
        rdf = _rdf(checkpoint, files, side, attachment)
        (folder / "README.md").write_text(_documentation(checkpoint, side, rdf), encoding="utf-8")
        (folder / "rdf.yaml").write_text(_yaml().safe_dump(rdf, sort_keys=False, allow_unicode=True), encoding="utf-8")
        members = ["rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy",
                   "weights_torchscript.pt", "weights.onnx", attachment.name]

        def write(tmp_zip: str) -> None:
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name in members:
                    archive.write(folder / name, name)

        atomic_write(out, write, suffix=".zip")
    log(f"wrote {out}")
    return out


def _package_preprocess_config(checkpoint: Any) -> Any:
    """Our preprocessing as a package's input sees it: a green model's input is RGB (it picks green inside)."""
    import dataclasses

    config = checkpoint.preprocess
    return dataclasses.replace(config, channels="rgb") if config.channels == "green" else config


# -- in: reading a package --------------------------------------------------------------------------
class _Files:
    """The files of a package: a zip's members or a folder's files, read by name only (never
    extracted, no path outside the folder), each at most MAX_MEMBER_BYTES."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        self.folder: Path | None = None
        self.prefix = ""
        if path.suffix.lower() == ".zip":
            try:
                self.zip = zipfile.ZipFile(path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise R2UNetError(f"cannot read the package {path}: {exc}; check that it is a complete .zip file") from exc
            names = self.zip.namelist()
            top = [n for n in names if n in RDF_NAMES]
            nested = [n for n in names if n.count("/") == 1 and n.split("/")[1] in RDF_NAMES]
            if not top and len(nested) == 1:
                self.prefix = nested[0].split("/")[0] + "/"
            elif not top:
                raise R2UNetError(f"{path} is a zip without an rdf.yaml: not a bioimage.io package")
            self.rdf_name = self.prefix + (top[0] if top else nested[0].split("/")[1])
        else:
            self.folder = path.parent
            self.rdf_name = path.name

    def read(self, name: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
        name = str(name)
        if "://" in name:
            raise R2UNetError(f"the package refers to {name} on the network; download it into the package (we read no URLs)")
        try:
            if self.zip is not None:
                member = self.zip.getinfo(name if name == self.rdf_name else self.prefix + name)
                if member.file_size > limit:
                    raise R2UNetError(f"{name} in {self.path.name} is {member.file_size / 1e6:.0f} MB; larger than we read")
                return self.zip.read(member)
            assert self.folder is not None
            target = (self.folder / name).resolve()
            if self.folder.resolve() not in target.parents and target != self.folder.resolve():
                raise R2UNetError(f"the package refers to {name}, outside its folder; refusing to read it")
            if target.stat().st_size > limit:
                raise R2UNetError(f"{name} is {target.stat().st_size / 1e6:.0f} MB; larger than we read")
            return target.read_bytes()
        except KeyError as exc:
            raise R2UNetError(f"{self.path.name} names {name}, which is not in the package") from exc
        except OSError as exc:
            raise R2UNetError(f"cannot read {name} of {self.path.name}: {exc.strerror or exc}") from exc

    def checked(self, descr: Any, what: str) -> bytes:
        """A file a description names (``{source, sha256}`` or a plain name), its SHA-256 checked when given."""
        source = descr.get("source") if isinstance(descr, dict) else descr
        if not isinstance(source, str) or not source:
            raise R2UNetError(f"the package's {what} names no file")
        data = self.read(source)
        expected = descr.get("sha256") if isinstance(descr, dict) else None
        if expected and _sha256(data) != str(expected).lower():
            raise R2UNetError(f"{source} in {self.path.name} does not match its SHA-256 in the rdf.yaml: the package is damaged")
        return data


def read_rdf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], _Files]:
    """The parsed rdf.yaml of a package and its files (one-line R2UNetError for what is not a model package)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise R2UNetError(f"{path} does not exist; check the package path")
    if path.is_dir():
        found = [path / n for n in RDF_NAMES if (path / n).is_file()]
        if not found:
            raise R2UNetError(f"{path} has no rdf.yaml: not a bioimage.io package folder")
        path = found[0]
    files = _Files(path)
    try:
        rdf = _yaml().safe_load(files.read(files.rdf_name, MAX_RDF_BYTES).decode("utf-8"))
    except R2UNetError:
        raise
    except Exception as exc:
        raise R2UNetError(f"the rdf.yaml of {path.name} does not parse ({type(exc).__name__}); the package is damaged") from exc
    if not isinstance(rdf, dict):
        raise R2UNetError(f"the rdf.yaml of {path.name} is not a description")
    if rdf.get("type") != "model":
        raise R2UNetError(f"{path.name} describes a {rdf.get('type')!r}, not a model")
    version = str(rdf.get("format_version", ""))
    if not re.match(r"^0\.[45]\.", version):
        raise R2UNetError(f"{path.name} has format_version {version or 'none'}; napari-r2unet reads bioimage.io model formats 0.4 and 0.5")
    return rdf, files


def _own_checkpoint(rdf: dict[str, Any], files: _Files) -> Path | None:
    """The checkpoint file of one of our packages (cached by SHA-256), or None for another tool's."""
    ours = rdf["config"].get(CONFIG_KEY) if isinstance(rdf.get("config"), dict) else None
    if not isinstance(ours, dict) or not isinstance(ours.get("checkpoint"), str):
        return None
    listed = {a.get("source"): a for a in rdf.get("attachments") or [] if isinstance(a, dict)}
    descr = listed.get(ours["checkpoint"], {"source": ours["checkpoint"], "sha256": ours.get("checkpoint_sha256")})
    return _cache_checkpoint(files.checked(descr, "checkpoint attachment"))


def describe_package(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Torch-free, for menus: one of our packages' checkpoint described by its metadata
    (:func:`~src_models.checkpoint_files.describe`), or None for another tool's package."""
    from .checkpoint_files import describe

    rdf, files = read_rdf(path)
    own = _own_checkpoint(rdf, files)
    return None if own is None else describe(own)


def load_package(path: str | os.PathLike[str]) -> Any:
    """A package -> a :class:`~src_models.checkpoint.Checkpoint`: ours as the original checkpoint,
    any other runnable one as a prediction-only checkpoint whose ``package`` is a :class:`Package`."""
    from .checkpoint import file_sha256, load_checkpoint

    rdf, files = read_rdf(path)
    own = _own_checkpoint(rdf, files)
    if own is not None:
        checkpoint = load_checkpoint(own)
        checkpoint.provenance.setdefault("package", str(Path(path)))
        return checkpoint
    package = Package.from_rdf(rdf, files)
    return package.checkpoint(Path(path), file_sha256(files.path) if files.path.is_file() else None)


def _cache_checkpoint(data: bytes) -> Path:
    """A package's checkpoint in the cache folder (by SHA-256), so it loads, and versions name it, as a file."""
    from .fileio import atomic_write, user_folder

    folder = user_folder("cache", "R2UNET_CACHE_DIR") / "packages"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise R2UNetError(f"cannot create the cache folder {folder}: {exc.strerror or exc}; check its permissions") from exc
    target = folder / f"{_sha256(data)[:16]}.safetensors"
    if not target.is_file():
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data), suffix=".safetensors")
    return target


# -- in: running another tool's package ------------------------------------------------------------
def _axes_of(tensor: dict[str, Any], version: str) -> list[dict[str, Any]]:
    """A tensor's axes as 0.5 dicts (0.4's "bcyx" strings converted; its sizes come from ``shape``)."""
    axes = tensor.get("axes")
    if isinstance(axes, str):  # format 0.4
        kinds = {"b": "batch", "c": "channel", "x": "space", "y": "space", "z": "space", "t": "time", "i": "index"}
        shape = tensor.get("shape")
        out = []
        for i, letter in enumerate(axes):
            axis: dict[str, Any] = {"type": kinds.get(letter, letter), "id": letter}
            if isinstance(shape, list):
                axis["size"] = shape[i]
            elif isinstance(shape, dict) and "min" in shape:
                axis["size"] = {"min": shape["min"][i], "step": shape["step"][i]}
            elif isinstance(shape, dict) and "reference_tensor" in shape:
                axis["size"] = "reference"
            out.append(axis)
        return out
    if not isinstance(axes, list) or not all(isinstance(a, dict) for a in axes):
        raise R2UNetError(f"a tensor of the package has no readable axes (format {version})")
    return [dict(a, id=a.get("id") or {"batch": "b", "channel": "c"}.get(a.get("type"), a.get("type"))) for a in axes]


def _axis_letter(axis: dict[str, Any]) -> str:
    kind = axis.get("type")
    return "b" if kind == "batch" else "c" if kind == "channel" else str(axis.get("id"))


def _size_rule(axes: list[dict[str, Any]]) -> tuple[int, int, int | None]:
    """(min, step, fixed) of the y and x axes together."""
    mins, steps, fixed = [], [], set()
    for axis in axes:
        if _axis_letter(axis) not in ("y", "x"):
            continue
        size = axis.get("size")
        if isinstance(size, int):
            fixed.add(size)
        elif isinstance(size, dict) and "min" in size:
            mins.append(int(size["min"]))
            steps.append(max(1, int(size.get("step", 1) or 1)))
        else:
            mins.append(1)
            steps.append(1)
    if len(fixed) > 1 or (fixed and mins):
        raise R2UNetError("the package's network takes a non-square or mixed fixed input size; napari-r2unet tiles square inputs")
    if fixed:
        side = fixed.pop()
        return side, side, side
    step = math.lcm(*steps) if steps else 1
    return max(mins or [1]), step, None


@dataclass
class Package:
    """Another tool's bioimage.io package of a 2D single-class network, runnable here."""

    name: str
    description: str
    licence: str
    in_axes: list[str]  # e.g. ["b", "c", "y", "x"]
    out_axes: list[str]
    channels: int
    min_size: int
    step: int
    fixed: int | None
    halo: int
    pre: list[dict[str, Any]]
    post: list[dict[str, Any]]
    weights_format: str
    weights: bytes = field(repr=False)
    input_name: str = INPUT_ID
    channel_names: list[str] = field(default_factory=list)
    class_name: str = "foreground"
    _run: Any = field(default=None, repr=False)
    _notes: set[str] = field(default_factory=set, repr=False)
    log: Log = field(default=lambda message: None, repr=False)

    @classmethod
    def from_rdf(cls, rdf: dict[str, Any], files: _Files) -> Package:
        version = str(rdf.get("format_version"))
        name = str(rdf.get("name") or files.path.stem)
        inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
        if len(inputs) != 1 or len(outputs) != 1:
            raise R2UNetError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; napari-r2unet runs networks with one of each")
        tin, tout = inputs[0], outputs[0]
        in_axes, out_axes = _axes_of(tin, version), _axes_of(tout, version)
        letters_in, letters_out = [_axis_letter(a) for a in in_axes], [_axis_letter(a) for a in out_axes]
        for letters, what in ((letters_in, "input"), (letters_out, "output")):
            extra = set(letters) - {"b", "c", "y", "x"}
            if extra or not {"y", "x"} <= set(letters):
                kind = "3D (z)" if "z" in extra else f"axes {''.join(letters)}"
                raise R2UNetError(f"{name}'s {what} has {kind}; napari-r2unet runs 2D networks (axes b, c, y, x)")
        channels_in, channel_names = _channel_count(in_axes, tin)
        channels_out, class_names = _channel_count(out_axes, tout, channels_in)
        if channels_out != 1:
            raise R2UNetError(f"{name} outputs {channels_out} channels; napari-r2unet runs single-class networks (one probability map)")
        if channels_in not in (1, 3):
            raise R2UNetError(f"{name} takes {channels_in} input channels; napari-r2unet feeds gray (1) or RGB (3) images")
        min_size, step, fixed = _size_rule(in_axes)
        halo = max([int(a.get("halo") or 0) for a in out_axes] + [int(h) for h in (tout.get("halo") or [])] + [0])
        weights = rdf.get("weights") or {}
        for fmt in ("onnx", "torchscript"):
            if isinstance(weights.get(fmt), dict):
                if weights[fmt].get("external_data"):
                    raise R2UNetError(f"{name}'s ONNX weights keep their data in another file; napari-r2unet reads single-file ONNX")
                data = files.checked(weights[fmt], f"{fmt} weights")
                break
        else:
            have = ", ".join(sorted(weights)) or "none"
            raise R2UNetError(f"{name} has {have} weights; napari-r2unet runs ONNX or TorchScript weights (pytorch_state_dict needs the "
                              "package's Python code, which we do not run)")
        return cls(name=name, description=str(rdf.get("description") or ""), licence=str(rdf.get("license") or ""),
                   in_axes=letters_in, out_axes=letters_out, channels=channels_in, min_size=min_size, step=step, fixed=fixed,
                   halo=halo, pre=_steps(tin.get("preprocessing")), post=_steps(tout.get("postprocessing")), weights_format=fmt,
                   weights=data, input_name=str(tin.get("id") or tin.get("name") or INPUT_ID),
                   channel_names=channel_names, class_name=(class_names or ["foreground"])[0])

    # the Checkpoint the rest of the engine sees
    def checkpoint(self, path: Path, sha256: str | None) -> Any:
        from .checkpoint import Checkpoint
        from .model_card import ModelCard
        from .nets import ModelConfig
        from .preprocessing import PreprocessConfig

        channels = "rgb" if self.channels == 3 else "gray"
        card = ModelCard(task=self.name, data="see the package's documentation", licence=self.licence,
                         channels=", ".join(self.channel_names) or channels)
        provenance = {"name": self.name, "description": self.description, "package": str(path)}
        return Checkpoint(ModelConfig(arch="unet", in_channels=self.channels, out_channels=1), {},
                          PreprocessConfig(channels=channels), (self.class_name,), provenance, path, sha256, card, package=self)

    def normalizer(self, chw: np.ndarray, channels: str) -> Callable[[np.ndarray], np.ndarray]:
        """The package's preprocessing fitted on the whole raw image ``(C, H, W)``: a function of its tiles."""
        from .preprocessing import _subsample, select_channels

        sample = select_channels(_subsample(chw), channels)
        steps = _fit_steps(self.pre, sample, ["c", "y", "x"])
        return lambda tile: np.nan_to_num(steps(select_channels(np.asarray(tile), channels)), nan=0.0, posinf=0.0, neginf=0.0)

    def _session(self) -> Callable[[np.ndarray], np.ndarray]:
        if self._run is None:
            if self.weights_format == "onnx":
                import onnxruntime as ort
                import torch

                from .export import session_options

                try:  # the thread budget of the caller, as our own models' sessions
                    session = ort.InferenceSession(self.weights, session_options(torch.get_num_threads()), providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise R2UNetError(f"onnxruntime cannot load {self.name}'s weights: {str(exc).splitlines()[0][:200]}") from exc
                feed = session.get_inputs()[0].name
                self._run = lambda x: session.run(None, {feed: x})[0]
            else:
                import torch

                try:
                    module = torch.jit.load(io.BytesIO(self.weights), map_location="cpu").eval()
                except Exception as exc:
                    raise R2UNetError(f"torch cannot load {self.name}'s TorchScript weights: {str(exc).splitlines()[0][:200]}") from exc

                def run(x: np.ndarray) -> np.ndarray:
                    with torch.inference_mode():
                        return module(torch.from_numpy(x)).float().numpy()

                self._run = run
        return self._run

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Normalised ``(N, C, h, w)`` float32 -> probabilities ``(N, 1, h, w)``; pads to the package's size rule."""
        n, c, h, w = batch.shape
        target = [max(s, self.min_size) for s in (h, w)]
        target = [self.fixed if self.fixed else int(math.ceil(s / self.step) * self.step) for s in target]
        if self.fixed and (h > self.fixed or w > self.fixed):
            raise R2UNetError(f"{self.name} takes {self.fixed} x {self.fixed} inputs; use tiles of at most that size")
        x = np.pad(batch, ((0, 0), (0, 0), (0, target[0] - h), (0, target[1] - w)), mode="reflect" if min(h, w) > 1 else "edge")
        present = ["b", "c", "y", "x"]
        if "b" not in self.in_axes:
            if n != 1:
                raise R2UNetError(f"{self.name} takes one image at a time; use batch size 1")
            x, present = x[0], present[1:]
        if "c" not in self.in_axes:
            x, present = x[:, 0] if present[0] == "b" else x[0], [a for a in present if a != "c"]
        x = np.ascontiguousarray(x.transpose([present.index(a) for a in self.in_axes]), dtype=np.float32)
        y = np.asarray(self._session()(x), dtype=np.float32)
        y = _to_bcyx(y, self.out_axes, n)
        if y.shape[2:] != tuple(target):
            raise R2UNetError(f"{self.name} returned {y.shape[2]} x {y.shape[3]} for a {target[0]} x {target[1]} input; "
                              "napari-r2unet runs networks whose output has the input's size")
        y = np.stack([_fit_steps(self.post, yi, ["c", "y", "x"], post=True)(yi) for yi in y])
        y = y[:, :, :h, :w]
        if float(np.nanmin(y)) < 0 or float(np.nanmax(y)) > 1:
            self._note("its output is not in [0, 1]: read as logits (sigmoid applied)")
            y = 1 / (1 + np.exp(-np.clip(y, -60, 60)))
        return np.nan_to_num(y, nan=0.0).astype(np.float32)

    def _note(self, message: str) -> None:
        if message not in self._notes:
            self._notes.add(message)
            self.log(f"{self.name}: {message}")


def _to_bcyx(y: np.ndarray, axes: list[str], n: int) -> np.ndarray:
    present = [a for a in ("b", "c", "y", "x") if a in axes]
    y = y.reshape(y.shape[-len(axes):]) if y.ndim > len(axes) and all(s == 1 for s in y.shape[:-len(axes)]) else y
    if y.ndim != len(axes):
        raise R2UNetError(f"the package's network returned {y.ndim} axes where its rdf.yaml describes {len(axes)}")
    y = y.transpose([axes.index(a) for a in present])
    if "b" not in axes:
        y = y[None]
    if "c" not in axes:
        y = y[:, None]
    return y


def _channel_count(axes: list[dict[str, Any]], tensor: dict[str, Any], reference: int | None = None) -> tuple[int, list[str]]:
    for i, axis in enumerate(axes):
        if axis.get("type") == "channel":
            names = axis.get("channel_names")
            if isinstance(names, list):
                return len(names), [str(n) for n in names]
            size = axis.get("size")
            if isinstance(size, int):
                return size, []
            shape = tensor.get("shape")
            if isinstance(shape, list) and isinstance(shape[i], int):
                return shape[i], []
            if isinstance(shape, dict) and "min" in shape and shape.get("step", [0] * len(axes))[i] == 0:
                return int(shape["min"][i]), []
            if isinstance(shape, dict) and "scale" in shape and reference is not None:  # 0.4: scale * reference + 2 * offset
                offset = (shape.get("offset") or [0] * len(axes))[i]
                return int(round(float(shape["scale"][i]) * reference + 2 * float(offset))), []
            raise R2UNetError("the package's channel axis has no fixed size; napari-r2unet needs a fixed channel count")
    return 1, []


def _steps(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise R2UNetError("the package's pre/post-processing is not a list of steps")
    steps = []
    for step in raw:
        if not isinstance(step, dict):
            raise R2UNetError("a pre/post-processing step of the package is not a description")
        steps.append({"id": str(step.get("id") or step.get("name")), "kwargs": dict(step.get("kwargs") or {})})
    return steps


def _reduce_axes(kwargs: dict[str, Any], layout: Sequence[str]) -> tuple[int, ...]:
    """The array axes (of ``layout``) a step's statistics run over: 0.5 ``axes`` lists or 0.4 strings."""
    axes = kwargs.get("axes")
    if axes is None:
        axes = [a for a in layout]  # the whole tensor
    letters = ["c" if a in ("c", "channel") else "b" if a in ("b", "batch") else str(a) for a in (list(axes) if not isinstance(axes, str) else list(axes))]
    return tuple(i for i, a in enumerate(layout) if a in letters)


def _per_axis(value: Any, x: np.ndarray, kwargs: dict[str, Any], layout: Sequence[str]) -> Any:
    """A scalar or a per-channel list (``axis``) of a fixed step, shaped to broadcast over ``x``."""
    if isinstance(value, list):
        axis = str(kwargs.get("axis", "c"))
        axis = "c" if axis in ("channel", "c") else axis
        shape = [1] * x.ndim
        shape[list(layout).index(axis)] = len(value)
        return np.asarray(value, dtype=np.float32).reshape(shape)
    return np.float32(value)


def _fit_steps(steps: list[dict[str, Any]], sample: np.ndarray, layout: Sequence[str], post: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """Pre/post-processing ``steps`` with their statistics measured on ``sample`` (axes ``layout``):
    returns the pointwise function they make, for the whole image or any tile of it."""
    fitted: list[Callable[[np.ndarray], np.ndarray]] = []
    x = np.asarray(sample, dtype=np.float32)
    for step in steps:
        kind, kwargs = step["id"], step["kwargs"]
        mode = kwargs.get("mode", "per_sample")
        if kind == "scale_range":
            if post and kwargs.get("reference_tensor"):
                raise R2UNetError("an output scale_range step that refers to the input tensor is not supported")
            axes = _reduce_axes(kwargs, layout)
            low, high = np.nanpercentile(x, [float(kwargs.get("min_percentile", 0)), float(kwargs.get("max_percentile", 100))],
                                         axis=axes, keepdims=True)
            eps = float(kwargs.get("eps", 1e-6))
            fn = _affine(low.astype(np.float32), (high - low + eps).astype(np.float32))
        elif kind == "zero_mean_unit_variance" and mode in ("per_sample", "per_dataset") and "mean" not in kwargs:
            axes = _reduce_axes(kwargs, layout)
            fn = _affine(np.nanmean(x, axis=axes, keepdims=True).astype(np.float32),
                         (np.nanstd(x, axis=axes, keepdims=True) + float(kwargs.get("eps", 1e-6))).astype(np.float32))
        elif kind in ("fixed_zero_mean_unit_variance", "zero_mean_unit_variance"):
            if "mean" not in kwargs or "std" not in kwargs:
                raise R2UNetError(f"the package's {kind} step gives no mean/std")
            fn = _affine(_per_axis(kwargs["mean"], x, kwargs, layout),
                         _per_axis(kwargs["std"], x, kwargs, layout) + np.float32(kwargs.get("eps", 1e-6)))
        elif kind == "scale_linear":
            gain, offset = _per_axis(kwargs.get("gain", 1.0), x, kwargs, layout), _per_axis(kwargs.get("offset", 0.0), x, kwargs, layout)
            fn = (lambda g, o: lambda t: t * g + o)(gain, offset)
        elif kind == "clip":
            fn = (lambda lo, hi: lambda t: np.clip(t, lo, hi))(kwargs.get("min"), kwargs.get("max"))
        elif kind == "sigmoid":
            fn = lambda t: 1 / (1 + np.exp(-np.clip(t, -60, 60)))  # noqa: E731
        elif kind == "binarize":
            fn = (lambda th: lambda t: (t > th).astype(np.float32))(float(kwargs.get("threshold", 0.5)))
        elif kind == "ensure_dtype":
            fn = lambda t: t  # noqa: E731 (we feed float32 and read float32)
        else:
            raise R2UNetError(f"the package's processing step {kind!r} is not supported by napari-r2unet "
                              "(we run scale_range, zero_mean_unit_variance, scale_linear, clip, sigmoid, binarize)")
        fitted.append(fn)
        x = fn(x)

    def apply(tile: np.ndarray) -> np.ndarray:
        out = np.asarray(tile, dtype=np.float32)
        for fn in fitted:
            out = fn(out)
        return np.asarray(out, dtype=np.float32)

    return apply


def _affine(offset: np.ndarray, scale: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda t: (t - offset) / scale
