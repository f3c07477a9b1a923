"""The training budget: --minutes alone, --epochs alone, both (whichever ends first), neither
(the defaults); why and when a run stopped; resuming with another budget.

The time budget is tested on a fake clock (each reading advances it by a fixed step), so the
tests count steps and epochs, never wall time: they run the same on a loaded machine.
"""

from __future__ import annotations

import types

import pytest
from conftest import docked_finetune

from src_models.cli import main
from src_models.errors import R2UNetError
from src_models.nets import ModelConfig
from src_models.preprocessing import PreprocessConfig
from src_models.synthetic import vessel_image
from src_models.training import FINETUNE_DEFAULTS, TrainConfig, Trainer, finetune_config, make_sample, resolve_budget

PP = PreprocessConfig()
TINY = ModelConfig(arch="r2unet", widths=(4, 8))


@pytest.fixture
def fake_clock(monkeypatch):
    """The trainer's clock, advanced by ``tick["s"]`` seconds at every reading."""
    import src_models.training.trainer as trainer_module

    tick, now = {"s": 0.02}, {"t": 0.0}

    def perf_counter() -> float:
        now["t"] += tick["s"]
        return now["t"]

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    return tick


def samples(n: int = 2):
    return [make_sample(str(i), *vessel_image((48, 48), seed=i), PP) for i in range(n)]


def small(**budget) -> TrainConfig:
    """A tiny run: 2 steps of 2 patches of 32 px per epoch."""
    return TrainConfig(patch_size=32, batch_size=2, steps_per_epoch=2, val_fraction=0.0, warmup_steps=1, **budget)


def run(config: TrainConfig, out, **kwargs) -> list:
    return list(Trainer(TINY, PP, samples(), config, out, **kwargs).run())


@pytest.mark.parametrize(("epochs", "minutes", "defaults", "expected"), [
    (None, 2.0, FINETUNE_DEFAULTS, {"epochs": None, "minutes": 2.0}),  # minutes alone: no epoch limit
    (7, None, FINETUNE_DEFAULTS, {"epochs": 7, "minutes": None}),  # epochs alone: no time limit
    (7, 2.0, FINETUNE_DEFAULTS, {"epochs": 7, "minutes": 2.0}),  # both: whichever ends first
    (None, None, FINETUNE_DEFAULTS, {"epochs": FINETUNE_DEFAULTS["epochs"], "minutes": None}),  # neither: the defaults
    (None, None, {}, {"epochs": TrainConfig().epochs, "minutes": None}),
])
def test_the_budget_rules(epochs, minutes, defaults, expected):
    assert resolve_budget(epochs, minutes, defaults) == expected
    if defaults:
        config = finetune_config(epochs=epochs, minutes=minutes, lr=None)
        assert (config.epochs, config.minutes) == (expected["epochs"], expected["minutes"])


def test_a_run_without_any_limit_is_refused():
    with pytest.raises(R2UNetError) as exc:
        TrainConfig(epochs=None, minutes=None)
    assert "\n" not in str(exc.value) and "epoch limit" in str(exc.value)
    with pytest.raises(R2UNetError, match="epochs=0 must be > 0"):
        TrainConfig(epochs=0)


def test_minutes_alone_trains_past_the_default_epochs_until_the_time_is_spent(tmp_path, fake_clock):
    config = finetune_config(minutes=0.05, patch_size=32, batch_size=2, steps_per_epoch=2)
    assert config.epochs is None
    trainer = Trainer(TINY, PP, samples(), config, tmp_path / "m.safetensors")
    events = list(trainer.run())
    final, steps = events[-1], [e for e in events if e.kind == "step"]
    assert final.kind == "done" and final.reason == "time" and final.fraction == 1.0
    assert trainer.state.epoch > FINETUNE_DEFAULTS["epochs"] and trainer.state.elapsed_s >= 3.0
    assert final.message.startswith(f"stopped at epoch {round(trainer.state.step / 2, 3):g} (step {trainer.state.step})")
    assert "time budget of 0.05 min is spent" in final.message
    assert all(e.epochs is None and e.total_steps is None for e in events)
    assert all(e.eta_s is not None and e.eta_s <= 3.0 for e in steps[1:])  # the time left
    assert "(no epoch limit)" in trainer.budget()
    # the learning rate follows the clock: up to its peak, then down to about 0 when the time is spent
    lrs = [e.lr for e in steps]
    assert max(lrs) > 0.9 * config.lr and lrs[-1] < 0.05 * config.lr


def test_epochs_alone_ignore_the_clock(tmp_path, fake_clock):
    fake_clock["s"] = 60.0  # a minute per reading: any time limit would have ended the run
    trainer = Trainer(TINY, PP, samples(), small(epochs=3), tmp_path / "m.safetensors")
    final = list(trainer.run())[-1]
    assert final.kind == "done" and final.reason == "epochs" and trainer.state.step == 6 and final.epochs == 3
    assert final.message == "finished at epoch 3 (step 6): the 3 epochs are done"


def test_both_limits_end_at_the_first(tmp_path, fake_clock):
    final = run(small(epochs=2, minutes=60.0), tmp_path / "a.safetensors")[-1]
    assert final.reason == "epochs" and final.step == 4
    fake_clock["s"] = 0.05
    trainer = Trainer(TINY, PP, samples(), small(epochs=1000, minutes=0.05), tmp_path / "b.safetensors")
    final = list(trainer.run())[-1]
    assert final.reason == "time" and 0 < trainer.state.epoch < 1000 and final.total_steps == 2000


def test_a_cancelled_run_says_where_it_stopped(tmp_path):
    calls = []
    trainer = Trainer(TINY, PP, samples(), small(epochs=5), tmp_path / "c.safetensors")
    final = list(trainer.run(should_stop=lambda: len(calls) > 2 or calls.append(1)))[-1]
    assert final.kind == "cancelled" and final.reason == "cancelled"
    assert final.message == "cancelled at epoch 1.5 (step 3); the best checkpoint is kept"


def test_resume_changes_the_budget_of_a_time_only_run(tmp_path, fake_clock):
    fake_clock["s"] = 0.05
    out = tmp_path / "m.safetensors"
    first = run(small(epochs=None, minutes=0.05), out)
    done = first[-1].step
    assert first[-1].reason == "time"
    second = run(small(epochs=None, minutes=0.1), out, resume=True)  # more time: it goes on
    assert second[-1].reason == "time" and second[-1].step > done
    lrs = [e.lr for e in second if e.kind == "step"]  # the first run used its time up: the longer budget's own schedule
    assert lrs[0] > 0.4 * small().lr and all(a >= b for a, b in zip(lrs, lrs[1:]))
    epochs = second[-1].epoch + 2
    third = run(small(epochs=epochs), out, resume=True)  # now an epoch limit and no time limit
    assert third[-1].reason == "epochs" and third[-1].epoch == epochs


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_minutes_alone_and_a_resume_that_keeps_the_budget(capsys, tmp_path, train_folders, fake_clock):
    images, masks = train_folders
    out = tmp_path / "m.safetensors"
    common = ["train", "r2unet", "--images", str(images), "--masks", str(masks), "--out", str(out), "--widths", "4,8",
              "--patch-size", "32", "--batch-size", "2", "--steps-per-epoch", "1", "--val-fraction", "0"]
    fake_clock["s"] = 0.01
    code, stdout, err = _cli(capsys, *common, "--minutes", "0.05")
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) > TrainConfig().epochs and "of the time budget)" in lines[0]  # "epoch 1 (3% of the time budget)"
    assert "time budget of 0.05 min is spent; best checkpoint: " in stdout
    steps = len(lines)
    code, stdout, err = _cli(capsys, *common, "--resume")  # no budget given: the saved one, already spent
    assert code == 0, err
    assert "time budget of 0.05 min is spent" in stdout and not any(line.startswith("epoch ") for line in stdout.splitlines())
    code, stdout, err = _cli(capsys, *common, "--resume", "--epochs", str(steps + 1))  # an epoch limit alone
    assert code == 0, err
    assert f"epoch {steps + 1}/{steps + 1}" in stdout and f"the {steps + 1} epochs are done" in stdout


def test_cli_finetune_epochs_alone_and_both(capsys, tmp_path, train_folders, tiny_checkpoint, fake_clock):
    images, masks = train_folders
    common = ["finetune", str(tiny_checkpoint), "--images", str(images), "--masks", str(masks),
              "--patch-size", "32", "--batch-size", "2", "--steps-per-epoch", "1"]
    code, stdout, err = _cli(capsys, *common, "--out", str(tmp_path / "a.safetensors"), "--epochs", "2")
    assert code == 0, err
    assert "epoch 2/2" in stdout and "finished at epoch 2 (step 2): the 2 epochs are done" in stdout
    code, stdout, err = _cli(capsys, *common, "--out", str(tmp_path / "b.safetensors"), "--epochs", "1000", "--minutes", "0.02")
    assert code == 0, err
    assert "the time budget of 0.02 min is spent" in stdout and "/1000" in stdout
    code, _, err = _cli(capsys, *common, "--out", str(tmp_path / "c.safetensors"), "--minutes", "-1")
    assert code == 1 and err.count("\n") == 1 and "minutes=-1.0 must be > 0" in err


# -- the Fine-tune widget follows the same rules ------------------------------------------------
@pytest.fixture
def fine_widget(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    image, mask = vessel_image((64, 64), seed=0, rgb=True)
    viewer.add_image(image, name="vessels", rgb=True)
    viewer.add_labels(mask, name="vessels drawn")
    fine = docked_finetune(viewer, str(tiny_checkpoint), "vessels drawn")
    fine.patch_spin.setValue(32)
    fine.batch_spin.setValue(2)
    fine.steps_spin.setValue(2)
    return fine


@pytest.mark.gui
def test_the_widget_budget_no_limit_and_a_time_only_run(fine_widget, qtbot):
    from src_models.finetune import DEFAULT_MINUTES

    fine = fine_widget
    request = fine.request()  # the widget's default: a time budget, no epoch limit
    assert (request.epochs, request.minutes) == (None, DEFAULT_MINUTES)
    assert (request.config().epochs, request.config().minutes) == (None, DEFAULT_MINUTES)
    fine.epochs_spin.setValue(3)
    fine.minutes_spin.setValue(0)  # "no limit"
    assert (fine.request().config().epochs, fine.request().config().minutes) == (3, None)
    fine.epochs_spin.setValue(0)  # both "no limit": refused, nothing starts
    fine.start()
    assert "both 'no limit'" in fine.status.text() and not fine.running
    fine.minutes_spin.setValue(0.1)  # 6 s, no epoch limit: only the clock ends it
    events = []
    fine._bridge.event.connect(events.append)
    fine.start()
    qtbot.waitUntil(lambda: not fine.running, timeout=120_000)
    assert events[-1].reason == "time" and events[-1].epochs is None, fine.status.text()
    status = fine.status.text()
    assert status.startswith("Fine-tuning stopped at epoch ") and "time budget of 0.1 min is spent" in status and "new version" in status
    assert fine.plot.projected and fine.plot.total_steps >= len(fine.plot.loss)


def test_the_widget_status_line_with_and_without_an_epoch_limit():
    from napari_r2unet._finetune_widget import _position
    from src_models.training import TrainEvent

    assert _position(TrainEvent("step", 52, 250, 2, 10)) == "epoch 3/10, step 52/250"
    assert _position(TrainEvent("step", 52, None, 2, None)) == "epoch 3, step 52"
