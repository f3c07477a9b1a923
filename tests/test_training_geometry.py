"""Training in the model card's ``resize`` geometry: letterboxed whole images, the card it saves,
fine-tuning in the base card's geometry, and the augmentation settings."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.errors import R2UNetError
from src_models.finetune import card_geometry
from src_models.model_card import Geometry, ModelCard, Postprocess
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig
from src_models.training import PatchDataset, TrainConfig, Trainer, make_sample, resume_path
from src_models.training.samples import letterbox_sample

PP = PreprocessConfig(channels="gray")
TINY = ModelConfig(arch="r2unet", in_channels=1, widths=(4, 8, 16))


def blob_sample(i: int, shape=(60, 90)) -> object:
    """A bright ellipse on a darker background, ``shape`` (landscape by default)."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = shape[0] * rng.uniform(0.3, 0.7), shape[1] * rng.uniform(0.3, 0.7)
    mask = ((yy - cy) / (shape[0] * 0.25)) ** 2 + ((xx - cx) / (shape[1] * 0.2)) ** 2 < 1
    image = (mask * 0.6 + 0.2 + rng.normal(0, 0.05, shape)).astype(np.float32)
    return make_sample(f"s{i}", image, mask.astype(np.uint8), PP)


def blob_folders(root) -> None:
    """``root/images`` and ``root/masks``: three blob images as PNG files."""
    from PIL import Image

    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(3):
        s = blob_sample(i, (40, 56))
        Image.fromarray((s.image[0].clip(0, 1) * 255).astype(np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray(s.mask * 255).save(root / "masks" / f"c{i}.png")


def fast(**overrides) -> TrainConfig:
    values = {"geometry": "resize", "patch_size": 48, "batch_size": 2, "epochs": 2, "steps_per_epoch": 2,
              "val_fraction": 0.0, "warmup_steps": 1, **overrides}
    return TrainConfig(**values)


def test_letterboxed_sample_ignores_the_padding():
    sample = blob_sample(0, (60, 90))
    boxed = letterbox_sample(sample, 48)
    assert boxed.image.shape == (1, 48, 48) and boxed.mask.shape == boxed.weight.shape == (48, 48)
    # a 60x90 image scaled to 32x48: 8 padded rows above and below, weight 0 and background there
    assert (boxed.weight[:8] == 0).all() and (boxed.weight[-8:] == 0).all() and (boxed.weight[8:40] == 1).all()
    assert boxed.mask[:8].max() == 0 and boxed.mask[8:40].max() == 1
    frac = sample.mask.mean()
    assert abs(boxed.mask[8:40].mean() - frac) < 0.03  # the lesion keeps its share of the image


def test_whole_image_items_and_augmentation_settings():
    samples = [letterbox_sample(blob_sample(i), 48) for i in range(3)]
    ds = PatchDataset(samples, fast(augment=False), 4)
    x, y, w = ds[0]
    assert x.shape == (1, 48, 48) and y.shape == w.shape == (48, 48)
    k = int(np.random.default_rng([0, 0, 0]).choice(3, p=ds._sample_p))
    assert torch.equal(y, torch.from_numpy(samples[k].mask.astype(np.int64)))  # the whole image, uncropped
    with pytest.raises(ValueError, match="not letterboxed"):
        PatchDataset([blob_sample(0)], fast(), 2)
    # upright images: no rot90 and no vertical flip, so the padded rows stay on top and bottom
    upright = PatchDataset(samples, fast(rot90=False, rotate=0.0, scale=0.0), 16)
    for i in range(16):
        _, _, w = upright[i]
        assert (w[:8] == 0).all() and (w[8:40] == 1).all()
    turned = PatchDataset(samples, fast(rotate=0.0, scale=0.0), 16)
    assert any((turned[i][2][:, :8] == 0).all() for i in range(16))  # rot90 moves the padding to the sides
    with pytest.raises(R2UNetError, match="rotate"):
        TrainConfig(rotate=200)
    with pytest.raises(R2UNetError, match="geometry"):
        TrainConfig(geometry="crop")


def test_aspect_augmentation_pads_a_band_as_inference_does():
    sample = letterbox_sample(blob_sample(0, (64, 64)), 48)
    assert (sample.weight == 1).all()  # a square image fills the letterbox
    config = fast(aspect=0.5, rotate=0.0, scale=0.0, rot90=False)
    ds = PatchDataset([sample], config, 64)
    bands = 0
    for i in range(64):
        x, y, w = ds[i]
        rows, cols = (w.sum(dim=1) == 0), (w.sum(dim=0) == 0)  # rows / columns left without weight
        if rows.any() or cols.any():
            bands += 1
            band = rows if rows.any() else cols
            assert not (rows.any() and cols.any())  # one side only shrinks
            assert band[0] and band[-1] and band.sum() <= 48 * 0.5 + 2  # centred, at most half the side
            assert y[w == 0].max() == 0  # no label in the padding
            image = x[0] if cols.any() else x[0].T  # columns across the band
            lead = int(torch.nonzero(~band)[0])  # the band before the image
            if lead >= 2:  # edge-padded as inference pads: the band repeats the image's first column
                assert torch.allclose(image[:, 0], image[:, lead - 1], atol=1e-5)
    assert 16 < bands < 48  # about half the items
    plain = PatchDataset([sample], fast(rotate=0.0, scale=0.0, rot90=False), 16)
    assert all((plain[i][2] == 1).all() for i in range(16))  # aspect 0 (the default): no band


def test_resize_training_saves_its_geometry_in_the_card(tmp_path):
    out = tmp_path / "m.safetensors"
    card = ModelCard(task="blob", postprocess=Postprocess("largest_component", 1, True))
    samples = [blob_sample(i) for i in range(4)]
    events = list(Trainer(TINY, PP, samples, fast(val_fraction=0.25), out, card=card).run())
    assert events[-1].kind == "done"
    ck = load_checkpoint(out)
    assert ck.model_card.geometry == Geometry("resize", 48)
    assert ck.model_card.task == "blob" and ck.model_card.postprocess.fill_holes
    # validation ran on the letterboxed hold-out image, padding excluded
    assert "F1" in ck.provenance["metrics"]
    tiled = tmp_path / "t.safetensors"
    list(Trainer(TINY, PP, samples, fast(geometry="tiled", patch_size=32), tiled, card=card).run())
    assert load_checkpoint(tiled).model_card.geometry == Geometry()


def test_fine_tuning_follows_the_base_card_geometry(tmp_path):
    path = tmp_path / "base.safetensors"
    save_checkpoint(path, build_model(TINY), TINY, PP, ("blob",),
                    card=ModelCard(task="blob", geometry=Geometry("resize", 64), metrics={"F1": 0.9}))
    base = load_checkpoint(path)
    config = card_geometry(base, TrainConfig(patch_size=96))
    assert (config.geometry, config.patch_size) == ("resize", 64)
    out = tmp_path / "tuned.safetensors"
    list(Trainer(None, None, [blob_sample(i) for i in range(2)], fast(patch_size=64), out, base=base).run())
    tuned = load_checkpoint(out).model_card
    assert tuned.geometry == Geometry("resize", 64) and tuned.task == "blob" and tuned.metrics == {}  # old metrics no longer hold
    from src_models.finetune import FinetuneRequest, PairData, build_trainer

    sample = blob_sample(0)  # the widget's and the CLI's path: no geometry asked for, the base card's taken
    pair = PairData("blob", sample.image[0], None, sample.mask, None)
    trainer = build_trainer(FinetuneRequest(base=base, pairs=[pair], out=tmp_path / "v.safetensors", name="v", epochs=1,
                                            device="cpu", settings={"steps_per_epoch": 2, "batch_size": 2}))
    assert (trainer.config.geometry, trainer.config.patch_size) == ("resize", 64)
    save_checkpoint(path, build_model(TINY), TINY, PP, ("blob",))
    assert card_geometry(load_checkpoint(path), TrainConfig(geometry="resize", patch_size=64)).geometry == "tiled"


def test_resume_accepts_a_run_saved_before_the_augmentation_settings(tmp_path):
    out = tmp_path / "m.safetensors"
    samples = [blob_sample(i) for i in range(2)]
    list(Trainer(TINY, PP, samples, fast(geometry="tiled", patch_size=32), out).run())
    state = torch.load(resume_path(out), weights_only=True)
    saved = json.loads(state["train_config"])
    for key in ("geometry", "rotate", "scale", "rot90"):
        saved.pop(key)
    state["train_config"] = json.dumps(saved)
    torch.save(state, resume_path(out))
    Trainer(TINY, PP, samples, fast(geometry="tiled", patch_size=32, epochs=3), out, resume=True)
    with pytest.raises(R2UNetError, match="settings differ.*rotate"):
        Trainer(TINY, PP, samples, fast(geometry="tiled", patch_size=32, rotate=90.0), out, resume=True)


def test_train_command_writes_the_card_options(tmp_path, capsys):
    from src_models.cli import main

    blob_folders(tmp_path)
    out = tmp_path / "m.safetensors"
    rc = main(["train", "r2unet", "--channels", "gray", "--widths", "4,8,16", "--geometry", "resize", "--patch-size", "32",
               "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--images", str(tmp_path / "images"),
               "--masks", str(tmp_path / "masks"), "--out", str(out), "--task", "blob", "--data", "three blobs (synthetic)",
               "--data-short", "blobs", "--keep-components", "2", "--fill-holes", "--threshold", "0.4", "--no-rot90"])
    assert rc == 0
    card = load_checkpoint(out).model_card
    assert (card.task, card.short_data, card.threshold) == ("blob", "blobs", 0.4)
    assert card.postprocess == Postprocess("largest_components", 2, True) and card.geometry == Geometry("resize", 32)
    assert load_checkpoint(out).provenance["train_config"]["rot90"] is False
    bad = tmp_path / "bad.json"
    bad.write_text('{"geometry": {"kind": "round"}}')
    capsys.readouterr()
    assert main(["train", "r2unet", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                 "--out", str(tmp_path / "b.safetensors"), "--card", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "invalid model card" in err and "Traceback" not in err and not (tmp_path / "b.safetensors").exists()


def test_train_init_starts_from_a_model_and_keeps_its_card(tmp_path, capsys):
    from src_models.cli import main

    blob_folders(tmp_path)
    common = ["--channels", "gray", "--widths", "4,8,16", "--geometry", "resize", "--patch-size", "32", "--epochs", "1",
              "--steps-per-epoch", "1", "--batch-size", "2", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]
    first = tmp_path / "first.safetensors"
    assert main(["train", "r2unet", *common, "--out", str(first), "--task", "blob", "--keep-components", "1", "--data", "blobs (20)",
                 "--data-short", "the blobs", "--card-tta"]) == 0
    base = load_checkpoint(first)
    before = first.read_bytes()
    second = tmp_path / "second.safetensors"
    assert main(["train", "r2unet", *common, "--lr", "1e-9", "--out", str(second), "--init", str(first)]) == 0
    trained = load_checkpoint(second)
    assert first.read_bytes() == before  # the starting model is only read
    assert trained.provenance["parent"] == base.name and trained.provenance["parent_sha256"] == base.sha256
    assert trained.model_card.task == "blob" and trained.model_card.postprocess == Postprocess("largest_component", 1, False)
    third = tmp_path / "third.safetensors"  # a card option with --init changes only that part of the start's card
    assert main(["train", "r2unet", *common, "--lr", "1e-9", "--out", str(third), "--init", str(first), "--data", "blobs and more (40)",
                 "--fill-holes"]) == 0
    card = load_checkpoint(third).model_card
    assert card.task == "blob" and card.tta and card.postprocess == Postprocess("largest_component", 1, True)
    assert card.data == "blobs and more (40)" and card.short_data == "blobs and more"  # the start's short name went with its data
    fourth = tmp_path / "fourth.safetensors"
    assert main(["train", "r2unet", *common, "--lr", "1e-9", "--out", str(fourth), "--init", str(first), "--no-card-tta"]) == 0
    assert not load_checkpoint(fourth).model_card.tta and load_checkpoint(fourth).model_card.task == "blob"
    name = "encoder.0.conv.weight" if "encoder.0.conv.weight" in base.state_dict else next(iter(base.state_dict))
    assert torch.allclose(trained.state_dict[name], base.state_dict[name], atol=1e-5)  # lr 1e-9: the start's weights
    capsys.readouterr()
    assert main(["train", "unet", *common, "--out", str(tmp_path / "x.safetensors"), "--init", str(first)]) != 0
    err = capsys.readouterr().err
    assert "is another model: arch 'r2unet' (options: 'unet')" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_camera_augmentations_zoom_blur_and_jpeg():
    from src_models.training.dataset import _jpeg

    sample = letterbox_sample(blob_sample(3, (64, 64)), 48)
    plain = fast(geometry="resize", rotate=0.0, scale=0.0, rot90=False)
    x0 = PatchDataset([sample], plain, 1)[0][0]
    blurred = PatchDataset([sample], fast(rotate=0.0, scale=0.0, rot90=False, blur=3.0), 30)
    rough = [float(np.abs(np.diff(blurred[i][0].numpy(), axis=-1)).mean()) for i in range(30)]
    sharp = float(np.abs(np.diff(x0.numpy(), axis=-1)).mean())
    assert min(rough) < 0.7 * sharp  # some patches blurred (a third, drawn per patch)
    x = np.random.default_rng(0).uniform(0, 1, (3, 32, 32)).astype(np.float32)
    x[0, 0, 0] = 1.5  # out-of-range values keep their excess
    y = _jpeg(x, 30)
    assert y.shape == x.shape and y.dtype == np.float32 and 0.01 < np.abs(y - x).mean() < 0.3 and y[0, 0, 0] > 1.0  # a JPEG alone ends at 1
    assert _jpeg(x[:1], 95).shape == (1, 32, 32) and np.abs(_jpeg(x[:1], 95) - x[:1]).mean() < np.abs(_jpeg(x[:1], 10) - x[:1]).mean()
    # inside the augmentation, patch by patch against the same index without it (blur and JPEG draw last,
    # so everything else about a patch is the same): some patches blurred or compressed, the others untouched
    bare = dict(rotate=0.0, scale=0.0, rot90=False, blur=0.0, jpeg=0)
    same = PatchDataset([sample], fast(**bare), 30)
    for camera in ({"blur": 3.0}, {"jpeg": 10}):
        changed = PatchDataset([sample], fast(**{**bare, **camera}), 30)
        equal = [np.array_equal(changed[i][0].numpy(), same[i][0].numpy()) for i in range(30)]
        assert 0 < sum(equal) < 30, camera
        assert all(np.array_equal(changed[i][1].numpy(), same[i][1].numpy()) for i in range(30))  # labels untouched
    zoomed = PatchDataset([sample], fast(rotate=0.0, rot90=False, zoom=(0.6, 0.61)), 20)
    shrunk = [int((zoomed[i][2] == 0).sum()) for i in range(20)]  # zoomed out: a frame without weight
    assert max(shrunk) > 0.4 * 48 * 48 and min(shrunk) == 0  # half the patches are warped
    config = TrainConfig(zoom=[0.6, 1.8])
    assert config.zoom == (0.6, 1.8) and TrainConfig(**{**config.to_dict()}).zoom == (0.6, 1.8)
    for bad in ((1.8, 0.6), (0.1, 1.0), (1.0,)):
        with pytest.raises(R2UNetError, match="zoom"):
            TrainConfig(zoom=bad)


def test_colour_shift_changes_hue_and_saturation_but_not_the_labels():
    from src_models.training.dataset import _colour_shift

    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.9, (3, 16, 16)).astype(np.float32)
    assert np.allclose(_colour_shift(np.random.default_rng(1), x, 0.0), x, atol=1e-5)  # strength 0: the image itself
    shifted = [_colour_shift(np.random.default_rng(i), x, 0.5) for i in range(20)]
    assert all(s.shape == x.shape and s.dtype == np.float32 and np.isfinite(s).all() for s in shifted)
    chroma = [float(np.abs(s - s.mean(0)).mean()) for s in shifted]  # saturation: distance from the gray axis
    base = float(np.abs(x - x.mean(0)).mean())
    assert min(chroma) < 0.85 * base < 1.15 * base < max(chroma)  # both less and more saturated
    gray = np.repeat(x[:1], 3, axis=0)  # a gray image: the hue turn and saturation leave it gray
    g = _colour_shift(np.random.default_rng(3), gray, 0.0)
    assert np.allclose(g[0], g[1], atol=1e-5) and np.allclose(g[1], g[2], atol=1e-5)
    rgb = blob_sample(2, (48, 48))
    rgb = dataclasses.replace(rgb, image=np.repeat(rgb.image[:1], 3, axis=0) * np.array([1.0, 0.7, 0.4], np.float32)[:, None, None])
    plain = PatchDataset([rgb], fast(rotate=0.0, scale=0.0, rot90=False, gamma=0.0), 10)
    coloured = PatchDataset([rgb], fast(rotate=0.0, scale=0.0, rot90=False, gamma=0.0, colour=0.5), 10)
    assert all(torch.equal(plain[i][1], coloured[i][1]) for i in range(10))  # the masks do not move
    assert sum(not torch.allclose(plain[i][0], coloured[i][0], atol=1e-3) for i in range(10)) >= 2  # half are shifted
    with pytest.raises(R2UNetError, match="colour"):
        TrainConfig(colour=2.0)


def test_l2sp_keeps_the_weights_near_the_starting_model(tmp_path):
    from src_models.checkpoint import Checkpoint

    torch.manual_seed(0)
    base = Checkpoint(TINY, build_model(TINY).state_dict(), PP, ("blob",), {"name": "start"})
    samples = [blob_sample(i) for i in range(3)]
    config = fast(geometry="tiled", patch_size=32, lr=0.05, epochs=1, steps_per_epoch=4)

    def distance(l2sp: float) -> float:
        trainer = Trainer(None, None, samples, dataclasses.replace(config, l2sp=l2sp), tmp_path / f"m{l2sp}.safetensors", base=base)
        list(trainer.run())
        return sum(float(((p.detach() - base.state_dict[n]) ** 2).sum()) for n, p in trainer.model.named_parameters())

    assert distance(10.0) < 0.5 * distance(0.0)
    with pytest.raises(R2UNetError, match="starting model"):
        Trainer(TINY, PP, samples, dataclasses.replace(config, l2sp=1.0), tmp_path / "x.safetensors")
