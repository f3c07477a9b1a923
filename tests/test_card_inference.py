"""Card-driven inference: the resize geometry, the card's threshold and post-processing in the
CLI, and the card shown by ``r2unet models`` / ``info``. Small synthetic checkpoints made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from src_models import checkpoint_files
from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.cli import main
from src_models.errors import CancelledError, R2UNetError
from src_models.geometry import letterbox, unletterbox
from src_models.inference import Segmenter
from src_models.labels import LabelSink, probabilities_to_labels
from src_models.model_card import Geometry, ModelCard, Postprocess
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig, preprocess

SIZE = 64  # the letterbox side of the resize cards here


def card_checkpoint(path: Path, card: ModelCard | None, channels: str = "rgb", seed: int = 0) -> Path:
    """A random tiny R2U-Net (widths 4-8-16) with ``card`` (None: saved without one, derived)."""
    torch.manual_seed(seed)
    config = ModelConfig(arch="r2unet", widths=(4, 8, 16), in_channels=3 if channels == "rgb" else 1)
    save_checkpoint(path, build_model(config), config, PreprocessConfig(channels=channels), ["lesion"], card=card)
    return path


def resize_card(**changes) -> ModelCard:
    return ModelCard(task="skin lesion", modality="dermoscopy", geometry=Geometry("resize", SIZE), **changes)


def manual_resize(seg: Segmenter, image: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """letterbox -> network -> unletterbox by hand, as training's samples see the image."""
    x = preprocess(image, seg.checkpoint.preprocess, channel_axis=channel_axis)
    boxed, box = letterbox(x, SIZE)
    with torch.inference_mode():
        probs = torch.sigmoid(seg.model(torch.from_numpy(boxed)[None]))[0].numpy()
    return unletterbox(probs, box)


@pytest.fixture
def resize_segmenter(tmp_path) -> Segmenter:
    return Segmenter(load_checkpoint(card_checkpoint(tmp_path / "skin.safetensors", resize_card())), "cpu", backend="torch")


@pytest.mark.parametrize(("shape", "channel_axis"), [((1024, 768, 3), -1), ((300, 900, 3), -1), ((3, 5, 7), 0), ((2, 3, 3), -1), ((1, 1), None)])
def test_resize_geometry_is_letterbox_forward_unletterbox(resize_segmenter, shape, channel_axis):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    probs = resize_segmenter.predict(image, channel_axis=channel_axis)
    height, width = (image.shape[:2] if channel_axis == -1 else image.shape[-2:])
    assert probs.shape == (1, height, width) and probs.dtype == np.float32
    # the same torch ops on the same input (the network's own edge padding is done outside it): equal
    np.testing.assert_allclose(probs, manual_resize(resize_segmenter, image, channel_axis), atol=1e-6)


def test_resize_geometry_with_onnxruntime_and_tta(tmp_path):
    pytest.importorskip("onnxruntime")
    ck = load_checkpoint(card_checkpoint(tmp_path / "skin.safetensors", resize_card()))
    torch_seg, onnx_seg = Segmenter(ck, "cpu", backend="torch"), Segmenter(ck, "cpu", backend="onnxruntime")
    image = np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    reference = manual_resize(torch_seg, image, -1)
    assert np.abs(onnx_seg.predict(image) - reference).max() < 1e-5  # kernels' summation order only
    x, box = letterbox(preprocess(image, ck.preprocess), SIZE)
    with torch.inference_mode():
        flips = [torch.sigmoid(torch_seg.model(torch.from_numpy(x)[None].flip(f)).flip(f)) if f else
                 torch.sigmoid(torch_seg.model(torch.from_numpy(x)[None])) for f in ((), (-1,), (-2,), (-2, -1))]
    tta = unletterbox((sum(flips) / 4)[0].numpy(), box)
    np.testing.assert_allclose(Segmenter(ck, "cpu", backend="torch", tta=True).predict(image), tta, atol=1e-6)


def test_resize_label_sink_progress_tiles_and_cancel(resize_segmenter):
    image = np.random.default_rng(2).integers(0, 256, (150, 110, 3), dtype=np.uint8)
    seen: list[float] = []
    probs = resize_segmenter.predict(image, progress=seen.append)
    assert seen == [0.0, 1.0]
    threshold = float(np.median(probs))  # half the pixels on each side: a sink that ignored it would differ
    sink = resize_segmenter.predict(image, out=LabelSink(1, 150, 110, threshold=threshold))
    assert isinstance(sink, LabelSink) and 0 < sink.labels.mean() < 1
    np.testing.assert_array_equal(sink.labels, probabilities_to_labels(probs, threshold))
    # tile, overlap and batch size have no effect in this geometry (a 3-pixel tile would be refused when tiled)
    np.testing.assert_array_equal(resize_segmenter.predict(image, tile=3, overlap=0.9, batch_size=7), probs)
    with pytest.raises(CancelledError):
        resize_segmenter.predict(image, should_stop=lambda: True)
    polls: list[int] = []  # torch polls before every conv: a stop raised inside the network cancels too
    with pytest.raises(CancelledError):
        resize_segmenter.predict(image, should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert len(polls) == 4 and resize_segmenter._should_stop is None


def test_resize_out_of_memory_moves_to_the_cpu_then_says_so(resize_segmenter):
    image = np.random.default_rng(6).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    reference, real, messages = resize_segmenter.predict(image), resize_segmenter._predict_batch, []
    calls: list[int] = []

    def once_short(batch: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    resize_segmenter._predict_batch, resize_segmenter.log = once_short, messages.append
    resize_segmenter.device = torch.device("cuda")  # as if on an accelerator: the retry moves to the CPU
    np.testing.assert_array_equal(resize_segmenter.predict(image), reference)
    assert messages == ["out of memory on the accelerator: retrying on the CPU"] and resize_segmenter.device.type == "cpu"
    resize_segmenter._predict_batch = lambda batch: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(R2UNetError, match=f"out of memory even with one {SIZE} x {SIZE} input on the CPU"):
        resize_segmenter.predict(image)


def test_resize_stacks_go_slice_by_slice(resize_segmenter):
    stack = np.random.default_rng(3).integers(0, 256, (3, 90, 60, 3), dtype=np.uint8)
    fractions: list[float] = []
    probs = resize_segmenter.predict_stack(stack, channel_axis=-1, progress=fractions.append)
    assert probs.shape == (3, 1, 90, 60) and fractions[-1] == 1.0 and fractions == sorted(fractions)
    for i in range(3):
        np.testing.assert_array_equal(probs[i], resize_segmenter.predict(stack[i]))


def test_tiled_cards_run_exactly_as_before(tmp_path):
    plain = Segmenter(load_checkpoint(card_checkpoint(tmp_path / "a.safetensors", None, "green")), "cpu", backend="torch")
    card = ModelCard(task="retinal vessels", threshold=0.3, postprocess=Postprocess("largest_component"))
    tiled = Segmenter(load_checkpoint(card_checkpoint(tmp_path / "b.safetensors", card, "green")), "cpu", backend="torch")
    assert plain.geometry.kind == tiled.geometry.kind == "tiled"
    image = np.random.default_rng(4).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    for run in ({}, {"tile": 48, "overlap": 0.25, "batch_size": 2}):
        np.testing.assert_array_equal(tiled.predict(image, **run), plain.predict(image, **run))
    x = torch.from_numpy(preprocess(image, tiled.checkpoint.preprocess))[None]
    with torch.inference_mode():
        whole = torch.sigmoid(tiled.model(x))[0].numpy()
    np.testing.assert_array_equal(tiled.predict(image), whole)  # one tile: the network on the whole image


# -- the command line ----------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_uses_the_card_threshold_unless_given(capsys, tmp_path):
    image = np.random.default_rng(5).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "lesion.tif", image)
    probe = card_checkpoint(tmp_path / "probe.safetensors", resize_card())
    assert run(capsys, "predict", str(probe), str(tmp_path / "lesion.tif"), "--out", str(tmp_path / "p"), "--save-prob", "--backend", "torch")[0] == 0
    prob = tifffile.imread(tmp_path / "p" / "lesion_prob.tif")
    low, high = (float(np.quantile(prob, q)) for q in (0.3, 0.7))
    model = card_checkpoint(tmp_path / "skin.safetensors", resize_card(threshold=round(high, 6)))  # same weights (seed)
    code, out, _ = run(capsys, "predict", str(model), str(tmp_path / "lesion.tif"), "--out", str(tmp_path / "card"), "--backend", "torch")
    assert code == 0 and out.startswith(f"threshold {round(high, 6):g} (the model card);")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "card" / "lesion.tif") > 0, prob >= round(high, 6))
    code, out, _ = run(capsys, "predict", str(model), str(tmp_path / "lesion.tif"), "--out", str(tmp_path / "given"),
                       "--threshold", f"{low}", "--backend", "torch")
    assert code == 0 and out.startswith(f"threshold {low:g} (--threshold);")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "given" / "lesion.tif") > 0, prob >= low)


def two_blobs(shape: tuple[int, int], big: tuple[int, int, int], small: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dark gray image with a big and a small bright disc; the masks of both discs."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    discs = [(yy - y) ** 2 + (xx - x) ** 2 <= r * r for y, x, r in (big, small)]
    return np.where(discs[0] | discs[1], 255, 0).astype(np.uint8), discs[0], discs[1]


@pytest.fixture
def pointwise_network(monkeypatch):
    """The network replaced by P = the normalised intensity (0 or 1 on these images), so the
    masks are exactly the bright discs and only the post-processing changes them."""
    monkeypatch.setattr(Segmenter, "_predict_batch", lambda self, batch: np.clip(batch[:, :1], 0.0, 1.0))


def test_predict_applies_the_card_post_processing_unless_told_not_to(capsys, tmp_path, pointwise_network):
    image, big, small = two_blobs((70, 90), (30, 30, 15), (50, 75, 5))
    Image.fromarray(image).save(tmp_path / "two.png")
    card = ModelCard(task="lesion", postprocess=Postprocess("largest_component"))
    model = card_checkpoint(tmp_path / "m.safetensors", card, "gray")
    code, out, _ = run(capsys, "predict", str(model), str(tmp_path / "two.png"), "--out", str(tmp_path / "o"), "--backend", "torch")
    assert code == 0 and "; post-processing: largest component (the model card)" in out.splitlines()[0]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o" / "two.tif"), big.astype(np.uint8) * 255)
    code, out, _ = run(capsys, "predict", str(model), str(tmp_path / "two.png"), "--out", str(tmp_path / "n"),
                       "--no-postprocess", "--backend", "torch")
    assert code == 0 and "; post-processing: none (--no-postprocess)" in out.splitlines()[0]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "n" / "two.tif"), (big | small).astype(np.uint8) * 255)


def test_evaluate_uses_the_post_processed_mask_and_prints_the_means(capsys, tmp_path, pointwise_network):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    truths = {}
    for name, (big, small) in {"a": ((30, 30, 15), (55, 75, 6)), "b": ((20, 60, 10), (55, 10, 7))}.items():
        image, disc, _ = two_blobs((70, 90), big, small)
        Image.fromarray(image).save(images / f"{name}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(masks / f"{name}.png")
        truths[name] = image
    model = card_checkpoint(tmp_path / "m.safetensors", ModelCard(postprocess=Postprocess("largest_component")), "gray")
    argv = ["evaluate", str(model), "--images", str(images), "--masks", str(masks), "--backend", "torch"]
    code, out, err = run(capsys, *argv, "--json")
    kept = json.loads(out)
    assert code == 0, err
    assert kept["postprocess"]["kind"] == "largest_component" and kept["threshold"] == 0.5
    assert kept["pooled"]["F1"] == kept["pooled"]["JS"] == 1.0 and kept["mean"]["JS"] == 1.0  # the small disc removed
    code, out, _ = run(capsys, *argv, "--json", "--no-postprocess")
    raw = json.loads(out)
    per_image = [i["metrics"] for i in raw["images"]]
    assert [i["id"] for i in raw["images"]] == ["a", "b"] and all(m["JS"] < 1 for m in per_image)
    assert raw["mean"]["JS"] == pytest.approx(np.mean([m["JS"] for m in per_image]))
    assert raw["mean"]["F1"] == pytest.approx(np.mean([m["F1"] for m in per_image]))
    assert raw["mean"]["JS"] != pytest.approx(raw["pooled"]["JS"])  # images weigh alike, not by pixels
    assert raw["pooled"]["AUC"] == kept["pooled"]["AUC"]  # AUC from the probabilities, not the mask
    code, out, _ = run(capsys, *argv, "--threshold", "0.7")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "threshold 0.7 (--threshold); post-processing: largest component (the model card)"
    assert lines[-2].startswith("mean") and f"JS {kept['mean']['JS']:.4f}" in lines[-2] and lines[-1].startswith("pooled")


def test_channel_notice_is_said_once_per_run(capsys, tmp_path):
    folder, masks = tmp_path / "gray", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    for seed in range(2):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50), dtype=np.uint8)).save(folder / f"{seed}.png")
        Image.fromarray(np.eye(40, 50, dtype=np.uint8) * 255).save(masks / f"{seed}.png")
    model = card_checkpoint(tmp_path / "skin.safetensors", resize_card())
    notice = "the skin lesion model expects RGB colour images; this gray image was repeated to 3 channels"
    code, out, err = run(capsys, "predict", str(model), str(folder), "--out", str(tmp_path / "o"), "--backend", "torch")
    assert code == 0 and out.count(" -> ") == 2 and err.count(notice) == 1
    code, out, err = run(capsys, "evaluate", str(model), "--images", str(folder), "--masks", str(masks), "--backend", "torch")
    assert code == 0 and out.splitlines()[-1].startswith("pooled") and err.count(notice) == 1


def test_models_and_info_show_the_card(capsys, tmp_path, monkeypatch, user_models_dir):
    weights = tmp_path / "weights"
    weights.mkdir()
    card_checkpoint(weights / "toy-skin.safetensors", resize_card(data="synthetic", licence="CC0"))
    monkeypatch.setattr(checkpoint_files, "WEIGHTS_DIR", weights)
    user_models_dir.mkdir()
    card_checkpoint(user_models_dir / "toy-lung.safetensors", ModelCard(task="lung fields"), "gray")
    code, out, _ = run(capsys, "models", "--json")
    data = json.loads(out)
    assert code == 0 and [(p["name"], p["task"]) for p in data["pretrained"]] == [("toy-skin", "skin lesion")]
    assert data["pretrained"][0]["card"]["geometry"] == {"kind": "resize", "size": SIZE}
    assert [v["task"] for v in data["versions"]] == ["lung fields"]
    code, out, _ = run(capsys, "models")
    assert code == 0 and any("toy-skin" in line and "skin lesion" in line for line in out.splitlines())
    assert any("toy-lung" in line and "lung fields" in line for line in out.splitlines())
    code, out, _ = run(capsys, "info", "toy-skin")
    card = load_checkpoint(weights / "toy-skin.safetensors").model_card
    assert code == 0 and all(f"    {line}" in out.splitlines() for line in card.lines())
    assert "    geometry: resize to 64x64 (aspect kept, padded; probabilities resized back)" in out.splitlines()
    code, out, _ = run(capsys, "info", "toy-skin", "--json")
    assert ModelCard.from_dict(json.loads(out)["card"]) == card
