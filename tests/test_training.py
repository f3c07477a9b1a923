"""The training engine: loss, patches, events, cancel, exact resume, early stop, fine-tuning, bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src_models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from src_models.errors import R2UNetError
from src_models.inference import Segmenter
from src_models.metrics import MetricAccumulator
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig
from src_models.synthetic import vessel_image
from src_models.training import (
    PatchDataset,
    TrainConfig,
    Trainer,
    emphasize_corrections,
    finetune_config,
    make_sample,
    resume_path,
    segmentation_loss,
)

PP = PreprocessConfig()
TINY = ModelConfig(arch="r2unet", widths=(4, 8, 16))


def synthetic_samples(n: int, size=(64, 64), seed0: int = 0, **kwargs):
    return [make_sample(str(seed0 + i), *vessel_image(size, seed=seed0 + i, **kwargs), PP) for i in range(n)]


def fast(**overrides) -> TrainConfig:
    return TrainConfig(**{"patch_size": 32, "batch_size": 4, "epochs": 2, "steps_per_epoch": 3, "val_fraction": 0.0, "warmup_steps": 1, **overrides})


def test_loss_ignores_zero_weight_pixels_and_handles_classes():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 8, 8) > 0.7).long()
    weight = torch.ones(2, 8, 8)
    weight[:, :4] = 0
    flipped = target.clone()
    flipped[:, :4] = 1 - flipped[:, :4]
    assert torch.allclose(segmentation_loss(logits, target, weight), segmentation_loss(logits, flipped, weight))
    multi = segmentation_loss(torch.randn(2, 3, 8, 8, requires_grad=True), torch.randint(0, 3, (2, 8, 8)), torch.ones(2, 8, 8))
    multi.backward()
    assert multi.item() > 0
    perfect = segmentation_loss(torch.where(target[:, None] > 0, 20.0, -20.0), target, torch.ones(2, 8, 8))
    assert perfect.item() < 1e-3


def test_fn_weight_half_is_the_soft_dice_and_more_costs_missed_foreground_more():
    import torch.nn.functional as F

    torch.manual_seed(1)
    logits, target, weight = torch.randn(2, 1, 8, 8), (torch.rand(2, 8, 8) > 0.6).long(), torch.rand(2, 8, 8)
    p, t = torch.sigmoid(logits[:, 0]), target.float()
    bce = (F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none") * weight).sum() / weight.sum()
    dice = 1 - (2 * (p * t * weight).sum() + 1) / (((p + t) * weight).sum() + 1)
    assert torch.allclose(segmentation_loss(logits, target, weight), bce + dice, atol=1e-6)
    assert torch.allclose(segmentation_loss(logits, target, weight, fn_weight=0.5), bce + dice, atol=1e-6)
    ones = torch.ones(1, 8, 8)
    truth = torch.zeros(1, 8, 8, dtype=torch.long)
    truth[:, 2:6, 2:6] = 1
    under = torch.where(truth[:, None] > 0, -3.0, -20.0)  # misses the object
    over = torch.full((1, 1, 8, 8), 3.0)  # covers everything
    for beta, worse in ((0.5, None), (0.8, "under"), (0.2, "over")):
        u, o = (segmentation_loss(x, truth, ones, fn_weight=beta) - segmentation_loss(x, truth, ones) for x in (under, over))
        if worse == "under":
            assert u > 0 > o
        elif worse == "over":
            assert o > 0 > u
        else:
            assert abs(u) < 1e-6 and abs(o) < 1e-6
    with pytest.raises(R2UNetError, match="fn_weight"):
        TrainConfig(fn_weight=1.0)


def test_patches_depend_only_on_seed_epoch_and_index():
    samples = synthetic_samples(3)
    ds = PatchDataset(samples, fast(), length=10)
    a = ds[4]
    assert [t.shape for t in a] == [(1, 32, 32), (32, 32), (32, 32)]
    assert all(torch.equal(x, y) for x, y in zip(a, ds[4]))
    ds.epoch = 1
    assert not torch.equal(a[0], ds[4][0])
    assert a[1].dtype == torch.int64 and set(a[1].unique().tolist()) <= {0, 1}


def test_foreground_balancing():
    samples = synthetic_samples(2)
    rich = PatchDataset(samples, fast(foreground_fraction=1.0, augment=False), length=40)
    poor = PatchDataset(samples, fast(foreground_fraction=0.0, augment=False), length=40)
    centre = lambda ds: np.mean([ds[i][1][16, 16].item() for i in range(40)])  # noqa: E731
    assert centre(rich) == 1.0 and centre(rich) > centre(poor)


def test_events_and_checkpoint(tmp_path):
    out = tmp_path / "m.safetensors"
    trainer = Trainer(TINY, PP, synthetic_samples(4), fast(val_fraction=0.25), out)
    events = list(trainer.run())
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == 6 and kinds.count("epoch") == 2 and "checkpoint" in kinds
    epoch = next(e for e in events if e.kind == "epoch")
    assert set(epoch.metrics) == {"F1", "SE", "SP", "ACC", "JS", "AUC"} and epoch.loss > 0
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 7)) and steps[-1].fraction == 1.0 and steps[-1].eta_s is not None
    ck = load_checkpoint(out)
    assert ck.provenance["training_data"]["val_ids"] == ["3"] and "F1" in ck.provenance["metrics"]
    assert resume_path(out).exists() and (tmp_path / "m.history.json").exists()


def _weights(path):
    return load_checkpoint(path).state_dict


def test_resume_is_exact(tmp_path):
    samples = synthetic_samples(3)
    straight = tmp_path / "a.safetensors"
    list(Trainer(TINY, PP, samples, fast(epochs=3), straight).run())
    # cancelled mid-epoch 2, then resumed to the end: the same weights, bit for bit
    split = tmp_path / "b.safetensors"
    calls = []
    list(Trainer(TINY, PP, samples, fast(epochs=3), split).run(should_stop=lambda: len(calls) > 4 or calls.append(1)))
    state = torch.load(resume_path(split), weights_only=True)
    assert state["state"]["step"] == 5
    events = list(Trainer(TINY, PP, samples, fast(epochs=3), split, resume=True).run())
    assert [e.step for e in events if e.kind == "step"] == [6, 7, 8, 9]  # went on; starting over ends the same
    assert events[-1].kind == "done" and events[-1].step == 9
    a = torch.load(resume_path(straight), weights_only=True)["model"]
    b = torch.load(resume_path(split), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    samples = synthetic_samples(2)
    out = tmp_path / "m.safetensors"
    with pytest.raises(R2UNetError, match="nothing to resume"):
        Trainer(TINY, PP, samples, fast(), out, resume=True)
    list(Trainer(TINY, PP, samples, fast(), out).run())
    with pytest.raises(R2UNetError, match="already exists; pass --resume"):
        Trainer(TINY, PP, samples, fast(), out)
    with pytest.raises(R2UNetError, match="settings differ.*lr"):
        Trainer(TINY, PP, samples, fast(lr=1e-4), out, resume=True)
    auto = tmp_path / "auto.safetensors"
    list(Trainer(TINY, PP, samples, fast(steps_per_epoch=None, epochs=1), auto).run())
    with pytest.raises(R2UNetError, match="steps per epoch, this data gives"):
        Trainer(TINY, PP, synthetic_samples(3, size=(256, 256)), fast(steps_per_epoch=None, epochs=1), auto, resume=True)
    Trainer(TINY, PP, samples, fast(epochs=5), out, resume=True)  # a longer budget is fine
    Trainer(TINY, PP, samples, fast(), out, overwrite=True)


def test_a_longer_budget_continues_the_learning_rate_decay(tmp_path):
    """A run stopped part-way and resumed with a longer budget goes on from its learning rate, decaying to 0."""
    samples, steps = synthetic_samples(2), []
    out = tmp_path / "m.safetensors"
    stop = lambda: len(steps) >= 6  # noqa: E731 (Ctrl-C after 6 of 10 steps)
    first = [e.lr for e in Trainer(TINY, PP, samples, fast(epochs=2, steps_per_epoch=5), out).run(should_stop=stop)
             if e.kind == "step" and not steps.append(e)]
    second = [e.lr for e in Trainer(TINY, PP, samples, fast(epochs=4, steps_per_epoch=5), out, resume=True).run() if e.kind == "step"]
    assert len(first) == 6 and len(second) == 14 and 0 < second[0] <= first[-1] * 1.01
    assert all(a >= b for a, b in zip(second, second[1:]))


def test_a_finished_run_given_a_longer_budget_trains_again(tmp_path):
    """A finished run's learning rate had decayed to 0: resumed with more epochs it must not train at 0."""
    samples, out = synthetic_samples(2), tmp_path / "m.safetensors"
    list(Trainer(TINY, PP, samples, fast(epochs=2, steps_per_epoch=5), out).run())
    resumed = Trainer(TINY, PP, samples, fast(epochs=4, steps_per_epoch=5), out, resume=True)
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    lrs = [e.lr for e in resumed.run() if e.kind == "step"]
    assert len(lrs) == 10 and lrs[0] > 0.4 * resumed.config.lr and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert any(not torch.equal(before[k], v) for k, v in resumed.model.state_dict().items())


def test_minutes_budget_drives_progress_and_keeps_the_partial_epoch(tmp_path):
    events = list(Trainer(TINY, PP, synthetic_samples(2), fast(epochs=1000, minutes=0.03, steps_per_epoch=1000), tmp_path / "m.safetensors").run())
    assert events[-1].kind == "done" and events[-1].reason == "time" and events[-1].fraction == 1.0 and "time budget" in events[-1].message
    assert any(e.kind == "checkpoint" for e in events)  # the partial epoch was scored and saved


def test_cancel_keeps_a_usable_checkpoint(tmp_path):
    out = tmp_path / "m.safetensors"
    events = list(Trainer(TINY, PP, synthetic_samples(2), fast(), out).run(should_stop=lambda: True))
    assert events[-1].kind == "cancelled" and "kept" in events[-1].message
    assert load_checkpoint(out).build() is not None


def test_a_cancel_part_way_keeps_the_best_epochs_file_as_it_was(tmp_path):
    """Cancelled in epoch 2, the file at OUT is still epoch 1's best checkpoint, not the unfinished weights."""
    from src_models.checkpoint import file_sha256

    out, steps, saved = tmp_path / "m.safetensors", [], []
    trainer = Trainer(TINY, PP, synthetic_samples(4), fast(epochs=3, steps_per_epoch=3, val_fraction=0.5), out)
    for event in trainer.run(should_stop=lambda: len(steps) >= 5):  # after 5 steps: in epoch 2
        if event.kind == "step":
            steps.append(event)
        elif event.kind == "checkpoint":
            saved.append(file_sha256(out))
    assert event.kind == "cancelled" and len(steps) == 5
    assert len(saved) == 1 and file_sha256(out) == saved[0]
    assert load_checkpoint(out).provenance["epochs"] == 1


def test_early_stopping(tmp_path):
    events = list(Trainer(TINY, PP, synthetic_samples(4), fast(epochs=6, lr=1e-12, patience=2, val_fraction=0.25), tmp_path / "m.safetensors").run())
    assert events[-1].kind == "early_stop" and events[-1].epoch == 3
    assert events[-1].message == "stopped early at epoch 3 (step 9): no improvement for 2 epochs (best: epoch 1)"


def test_early_stopping_counts_from_the_last_improvement(tmp_path):
    """Patience 2 with validation F1 0.5, 0.4, 0.6, 0.55, 0.5: epoch 3 improves, so the run stops at epoch 5
    (two bad epochs after the best), not at epoch 4."""
    trainer = Trainer(TINY, PP, synthetic_samples(4), fast(epochs=8, patience=2, val_fraction=0.25), tmp_path / "m.safetensors")
    scores = iter([0.5, 0.4, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35])
    trainer._validate_unless_cancelled = lambda: {"F1": next(scores)}
    events = list(trainer.run())
    assert events[-1].kind == "early_stop" and events[-1].epoch == 5 and "(best: epoch 3)" in events[-1].message


def test_bad_training_data(tmp_path):
    img, mask = vessel_image((40, 40), seed=0)
    with pytest.raises(R2UNetError, match="mask shape"):
        make_sample("a", img, mask[:30], PP)
    with pytest.raises(R2UNetError, match="every mask is empty"):
        Trainer(TINY, PP, [make_sample("a", img, np.zeros_like(mask), PP)], fast(), tmp_path / "m.safetensors")
    with pytest.raises(R2UNetError, match="labels up to 2"):
        Trainer(TINY, PP, [make_sample("a", img, mask * 2, PP)], fast(), tmp_path / "m.safetensors")
    with pytest.raises(R2UNetError, match="input channel"):
        Trainer(TINY.replace(in_channels=3), PP, [make_sample("a", img, mask, PP)], fast(), tmp_path / "m.safetensors")
    with pytest.raises(R2UNetError, match=r"\.safetensors"):
        Trainer(TINY, PP, [make_sample("a", img, mask, PP)], fast(), tmp_path / "m.pt")
    with pytest.raises(R2UNetError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(R2UNetError, match="seed"):
        TrainConfig(seed=-1)
    two = [make_sample("a", img, mask, PP), make_sample("b", img, np.zeros_like(mask), PP)]
    with pytest.raises(R2UNetError, match="no training image with foreground"):
        Trainer(TINY, PP, two, fast(val_ids=("a",)), tmp_path / "m.safetensors")
    with pytest.raises(R2UNetError, match="every validation mask is empty"):
        Trainer(TINY, PP, two, fast(val_ids=("b",)), tmp_path / "m.safetensors")
    with pytest.raises(R2UNetError, match=r"^validation ids c, d, e, f, g and 1 more are not among .*--val-ids$"):
        Trainer(TINY, PP, two, fast(val_ids=tuple("cdefgh")), tmp_path / "m.safetensors")


def test_val_ids_match_file_names_in_any_case():
    """Sample ids are lower-cased file stems: --val-ids ISIC_0001 holds out isic_0001."""
    from src_models.training.samples import split_validation

    img, mask = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8)
    samples = [make_sample(i, img, mask, PP) for i in ("isic_0001", "isic_0002", "isic_0003")]
    train, val = split_validation(samples, fast(val_ids=("ISIC_0002", " isic_0003")))
    assert [s.id for s in val] == ["isic_0002", "isic_0003"] and [s.id for s in train] == ["isic_0001"]
    widget = [make_sample(i, img, mask, PP) for i in ("Labels", "Labels:holdout0")]  # layer names keep their case
    train, val = split_validation(widget, fast(val_ids=("Labels:holdout0",)))
    assert [s.id for s in val] == ["Labels:holdout0"] and [s.id for s in train] == ["Labels"]


def test_multiclass_training_from_label_images(tmp_path):
    from PIL import Image

    from src_models.training import load_samples

    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    for seed in range(2):
        img, mask = vessel_image((48, 48), seed=seed)
        labels = mask.copy()
        labels[:, :24] *= 2  # two foreground classes
        Image.fromarray(img).save(tmp_path / "i" / f"{seed}.png")
        Image.fromarray(labels).save(tmp_path / "l" / f"{seed}.png")
    samples = load_samples(tmp_path / "i", tmp_path / "l", None, PP, classes=3)
    assert max(int(s.mask.max()) for s in samples) == 2
    events = list(Trainer(TINY.replace(out_channels=3), PP, samples, fast(), tmp_path / "m.safetensors").run())
    assert events[-1].kind == "done"
    with pytest.raises(R2UNetError, match="labels up to 2"):
        load_samples(tmp_path / "i", tmp_path / "l", None, PP, classes=2)


def test_tiny_images_and_nan_pixels_train(tmp_path):
    img, mask = vessel_image((20, 24), seed=1)
    noisy = img.astype(np.float32)
    noisy[3:6, 3:6] = np.nan
    sample = make_sample("t", noisy, mask, PP)
    assert sample.weight[4, 4] == 0 and np.isfinite(sample.image).all()
    events = list(Trainer(TINY, PP, [sample], fast(), tmp_path / "m.safetensors").run())
    assert events[-1].kind == "done" and np.isfinite([e.loss for e in events if e.kind == "step"]).all()


def _dice(checkpoint_path, seeds):
    seg = Segmenter(load_checkpoint(checkpoint_path), "cpu")
    acc = MetricAccumulator()
    for s in seeds:
        img, mask = vessel_image((96, 96), seed=s)
        acc.add(seg.predict(img)[0], mask)
    return acc.pooled()["F1"]


@pytest.mark.slow
def test_finetuning_a_weak_model_on_two_corrected_images_helps_and_keeps_the_base(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(arch="r2unet", widths=(8, 16, 32))
    base_path = tmp_path / "weak.safetensors"
    weak = Trainer(config, PP, synthetic_samples(2, seed0=100), fast(epochs=1, steps_per_epoch=4, lr=1e-3), base_path)
    list(weak.run())
    before_hash = file_sha256(base_path)
    before = _dice(base_path, range(200, 204))
    base = load_checkpoint(base_path)
    corrected = synthetic_samples(2, size=(96, 96), seed0=300)
    out = tmp_path / "tuned.safetensors"
    events = list(Trainer(None, None, corrected, finetune_config(epochs=6, steps_per_epoch=10, patch_size=48, lr=2e-3, freeze="none"), out, base=base).run())
    assert events[-1].kind == "done"
    after = _dice(out, range(200, 204))
    assert after > before + 0.05, (before, after)
    assert file_sha256(base_path) == before_hash
    tuned = load_checkpoint(out)
    assert tuned.provenance["parent_sha256"] == before_hash and tuned.provenance["parent"] == "weak"
    with pytest.raises(R2UNetError, match="never overwritten"):
        Trainer(None, None, corrected, finetune_config(), base_path, base=base)


def test_corrections_raise_the_weight_of_corrected_pixels():
    sample = synthetic_samples(1)[0]
    corrected = np.zeros(sample.mask.shape, bool)
    corrected[:10] = True
    emphasized = emphasize_corrections(sample, corrected, 5.0)
    assert np.allclose(emphasized.weight[:10], 5 * sample.weight[:10]) and np.array_equal(emphasized.weight[10:], sample.weight[10:])
    with pytest.raises(R2UNetError, match="correction map shape"):
        emphasize_corrections(sample, corrected[:5], 5.0)


def test_freezing(tmp_path):
    base_path = tmp_path / "base.safetensors"
    save_checkpoint(base_path, build_model(TINY), TINY, PP, ["vessel"])
    base = load_checkpoint(base_path)
    trainer = Trainer(None, None, synthetic_samples(2), finetune_config(freeze="encoder", epochs=1, steps_per_epoch=2, patch_size=32), tmp_path / "t.safetensors", base=base)
    list(trainer.run())
    tuned = load_checkpoint(tmp_path / "t.safetensors").state_dict
    for key, value in base.state_dict.items():
        if key.startswith("encoder."):  # weights and BN statistics untouched
            assert torch.equal(tuned[key], value), key
    assert any(not torch.equal(tuned[k], base.state_dict[k]) for k in tuned if k.startswith("decoder."))


def test_freezing_bn_keeps_every_batch_norm_statistic(tmp_path):
    """freeze="bn", every fine-tune's default: few images must not move the base's running statistics."""
    from conftest import with_trained_statistics

    base_path = tmp_path / "base.safetensors"
    save_checkpoint(base_path, with_trained_statistics(build_model(TINY)), TINY, PP, ["vessel"])
    base = load_checkpoint(base_path)
    trainer = Trainer(None, None, synthetic_samples(2), finetune_config(freeze="bn", epochs=1, steps_per_epoch=2, patch_size=32), tmp_path / "t.safetensors", base=base)
    list(trainer.run())
    tuned = load_checkpoint(tmp_path / "t.safetensors").state_dict
    statistics = [k for k in base.state_dict if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(tuned[k], base.state_dict[k]) for k in statistics)
    assert any(not torch.equal(tuned[k], base.state_dict[k]) for k in tuned if k.endswith("weight"))  # it did train


def test_every_setting_has_help_and_its_bounds_are_enforced():
    import dataclasses

    from src_models.training import FINETUNE_DEFAULTS

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        low = f.metadata.get("min")
        if low is not None:
            below = low if f.metadata.get("min_exclusive") else (low - 1 if f.type.startswith("int") else low - 0.5)
            with pytest.raises(R2UNetError, match=f.name):
                TrainConfig(**{f.name: below})
    assert TrainConfig.__dataclass_fields__["freeze"].metadata["choices"] == ("none", "bn", "encoder")
    assert finetune_config().lr == FINETUNE_DEFAULTS["lr"] == 3e-4
    assert finetune_config(lr=None, epochs=3).epochs == 3


def test_event_kinds_are_one_enum_that_compares_as_text():
    from src_models.training import EventKind, TrainEvent

    event = TrainEvent("step", 0, 1, 0, 1)
    assert event.kind is EventKind.STEP and event.kind == "step" and f"{event.kind}" == "step"
    assert [k for k in EventKind if k.is_final] == [EventKind.DONE, EventKind.CANCELLED, EventKind.EARLY_STOP]
    with pytest.raises(ValueError):
        TrainEvent("stpe", 0, 1, 0, 1)
