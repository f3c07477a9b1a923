"""The folder annotation session (core): state, order, autosaved corrections, locks, retrain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import image_folder
from PIL import Image

from src_models import annotation
from src_models.annotation import CORRECTED, DONE, NEW, PREDICTED, FolderSession
from src_models.annotation_run import adopt_version, predict_pending, retrain_request, training_pairs
from src_models.errors import R2UNetError
from src_models.label_files import read_label_file


def segmenter_for(checkpoint: Path):
    from src_models.inference import Segmenter
    from src_models.model_names import load_model
    from src_models.predict import card_options

    model = load_model(str(checkpoint))
    return Segmenter(model, device="cpu", backend="torch"), card_options(model)


def test_open_scan_lock_and_resume(tmp_path):
    images, _ = image_folder(tmp_path)
    session = FolderSession(images)
    assert session.labels_dir == images / "labels" and session.state_path.exists()
    assert [e.status for e in session.entries.values()] == [NEW] * 4
    with pytest.raises(R2UNetError, match=r"is open in another napari .*pid \d+ .*close it there first, or delete .*lock"):
        FolderSession(images)
    session.set_current("im2")
    session.close()
    assert not (session.labels_dir / annotation.LOCK_FILE).exists()
    with FolderSession(images) as again:
        assert again.current == "im2"


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    images, _ = image_folder(tmp_path, count=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    labels = images / "labels"
    labels.mkdir()
    import socket

    (labels / annotation.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
    FolderSession(images).close()  # no error: that process is gone
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another napari that still runs
    try:
        (labels / annotation.LOCK_FILE).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "token": "y"}))
        with pytest.raises(R2UNetError, match="is open in another napari"):
            FolderSession(images)
    finally:
        alive.kill()
        alive.wait()


def test_predictions_order_and_corrections(tmp_path, trained_checkpoint):
    images, truth = image_folder(tmp_path)
    session = FolderSession(images, tmp_path / "corrections")
    session.set_model(str(trained_checkpoint))
    segmenter, options = segmenter_for(trained_checkpoint)
    assert list(predict_pending(session, segmenter, options, lambda: False, first=lambda: "im3")) == ["im3", "im0", "im1", "im2"]
    assert all(e.status == PREDICTED and e.model == str(trained_checkpoint) for e in session.entries.values())
    most = max(session.entries.values(), key=lambda e: e.uncertainty)
    assert session.next_id("uncertainty") == most.id
    assert session.next_id("sequential", after="im3") == "im0"
    probs, labels = session.prediction("im1")
    assert probs.shape == (1, 64, 64) and labels.shape == (64, 64)

    assert not session.save_correction("im1", labels)  # unchanged: not a correction
    assert not session.correction_path("im1").exists()
    fixed = labels.copy()
    fixed[:8] = 1
    assert session.save_correction("im1", fixed)
    entry = session.entries["im1"]
    assert entry.status == CORRECTED and entry.corrected_pixels == int((fixed != labels).sum())
    assert tifffile.imread(session.correction_path("im1")).max() == 255  # 0/255 on disk
    read, header = read_label_file(session.correction_path("im1"))
    assert np.array_equal(read, fixed) and header["image"] == "im1.png" and header["prediction_model"] == str(trained_checkpoint)
    # a new prediction never replaces it
    assert not session.save_prediction("im1", probs, np.ones_like(labels), model="other")
    assert np.array_equal(session.saved_labels("im1"), fixed)
    assert np.array_equal(session.prediction("im1")[1], labels) and session.entries["im1"].model == str(trained_checkpoint)
    assert session.next_id("uncertainty") != "im1" and "im1" not in session.to_predict()
    # an unchanged prediction is saved when the person marks it done
    assert session.save_correction("im2", session.prediction("im2")[1], done=True)
    assert session.entries["im2"].status == DONE and session.saved_ids() == ["im1", "im2"]
    session.close()

    with FolderSession(images, tmp_path / "corrections") as again:  # resume: everything is back
        assert again.entries["im1"].status == CORRECTED and again.entries["im2"].status == DONE
        assert again.model == str(trained_checkpoint) and again.to_predict() == []
        pairs = training_pairs(again)
        assert [p.id for p in pairs] == ["im1", "im2"]
        assert int(pairs[0].changed.sum()) == again.entries["im1"].corrected_pixels and not pairs[1].changed.any()


def test_existing_masks_start_corrected_and_a_mismatch_is_one_line(tmp_path):
    images, truth = image_folder(tmp_path, count=2)
    with FolderSession(images, masks=truth) as session:
        assert session.entries["im0"].status == CORRECTED
        assert session.saved_labels("im0", (64, 64)).max() == 1
        with pytest.raises(R2UNetError, match=r"the mask for im0 is 64x64 but its image is 32x40; replace or remove"):
            session.saved_labels("im0", (40, 32))
    assert sorted(p.name for p in truth.iterdir()) == ["im0.png", "im1.png"]


def test_unreadable_and_vanished_images_are_skipped(tmp_path, trained_checkpoint):
    images, _ = image_folder(tmp_path, count=3)
    (images / "im1.png").write_bytes(b"not a png")
    session = FolderSession(images)
    session.set_model(str(trained_checkpoint))
    segmenter, options = segmenter_for(trained_checkpoint)
    reports: list[str] = []
    assert list(predict_pending(session, segmenter, options, lambda: False, report=reports.append)) == ["im0", "im2"]
    assert len(reports) == 1 and "im1.png" in reports[0] and "it is skipped" in reports[0]
    assert session.entries["im1"].error and session.next_id("sequential", after="im0") == "im2"
    session.close()
    (images / "im2.png").unlink()
    with FolderSession(images) as again:
        assert again.entries["im2"].error.startswith("vanished")
        assert again.next_id("sequential") == "im0"


def test_a_full_or_read_only_labels_folder_loses_nothing(tmp_path, monkeypatch):
    images, _ = image_folder(tmp_path, count=1)
    session = FolderSession(images)
    before = session.state_path.read_text()

    def full(*args, **kwargs):
        raise R2UNetError(f"cannot write in {session.labels_dir}: No space left on device; check the folder's space and permissions")

    from src_models import label_files

    original = annotation.atomic_write
    monkeypatch.setattr(annotation, "atomic_write", full)
    monkeypatch.setattr(label_files, "atomic_write", full)
    with pytest.raises(R2UNetError, match="No space left on device"):
        session.save_correction("im0", np.ones((64, 64), np.uint8))
    assert session.state_path.read_text() == before and not session.correction_path("im0").exists()
    assert session.entries["im0"].status == NEW and not session.entries["im0"].saved_at  # nor does it think it saved
    monkeypatch.setattr(annotation, "atomic_write", original)
    monkeypatch.setattr(label_files, "atomic_write", original)
    session.close()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the labels folder should be")
    with pytest.raises(R2UNetError, match="cannot create the labels folder .*choose a labels folder you can write to"):
        FolderSession(images, blocked)


def test_retrain_on_the_folder_and_adopt_the_version(tmp_path, trained_checkpoint, user_models_dir):
    from src_models.finetune import finetune
    from src_models.user_versions import new_version_path

    images, truth = image_folder(tmp_path, count=3)
    session = FolderSession(images)
    with pytest.raises(R2UNetError, match="no model yet"):
        retrain_request(session, tmp_path / "v.safetensors", "v")
    session.set_model(str(trained_checkpoint))
    with pytest.raises(R2UNetError, match="no saved correction in this folder yet"):
        retrain_request(session, tmp_path / "v.safetensors", "v")
    for i in range(2):
        session.save_correction(f"im{i}", (np.asarray(Image.open(truth / f"im{i}.png")) > 0).astype(np.uint8), done=True)
    out = new_version_path("trained")
    request = retrain_request(session, out, "folder v1", minutes=None, epochs=1, validation="none",
                              settings={"patch_size": 32, "steps_per_epoch": 2, "batch_size": 2})
    assert [p.id for p in request.pairs] == ["im0", "im1"] and "2 corrected image(s)" in request.description
    path = finetune(request, lambda event: None, lambda: False)
    adopted, why = adopt_version(session, path)
    assert adopted and session.model == path and "now predicts with" in why
    assert session.to_predict() == ["im2"]  # the uncorrected image is predicted again; corrections never
    session.close()


def test_auto_validation_holds_out_whole_images_from_three_on(tmp_path, trained_checkpoint):
    from src_models.annotation_run import auto_validation, held_out_images
    from src_models.finetune import build_samples, load_base

    assert held_out_images(["a", "b", "c"]) == ("b",) and held_out_images(list("abcdefghij")) == ("c", "h")
    assert auto_validation("r2unet-drive", ["a", "b"]) == ("holdout", ())  # tiled: blocks of each image
    assert auto_validation("r2unet-skin", ["a", "b"]) == ("none", ())  # whole-image model: too few to hold one out
    assert auto_validation("r2unet-skin", ["a", "b", "c"]) == ("images", ("b",))
    images, truth = image_folder(tmp_path, count=3)
    session = FolderSession(images)
    session.set_model(str(trained_checkpoint))
    segmenter, options = segmenter_for(trained_checkpoint)
    list(predict_pending(session, segmenter, options, lambda: False))
    for i in range(3):
        session.save_correction(f"im{i}", (np.asarray(Image.open(truth / f"im{i}.png")) > 0).astype(np.uint8), done=True)
    request = retrain_request(session, tmp_path / "v.safetensors", "v")
    assert (request.validation, request.held_out) == ("images", ("im1",))
    base = load_base(request.base)
    samples, config = build_samples(request, base, request.config())
    assert config.val_ids == ("im1",) and sorted(s.id for s in samples) == ["im0", "im1", "im2"]
    assert samples[0].weight.max() > 1 and samples[1].weight.max() == 1  # a held-out image's corrections are not weighted up
    session.close()


def test_the_rest_is_rehearsed_and_checked_on_its_confident_predictions_never_trained_and_validated_at_once(tmp_path, trained_checkpoint):
    from src_models.annotation_run import REHEARSAL_WEIGHT, rest_pairs
    from src_models.finetune import build_samples, load_base

    images, truth = image_folder(tmp_path, count=5)
    session = FolderSession(images)
    session.set_model(str(trained_checkpoint))
    segmenter, options = segmenter_for(trained_checkpoint)
    list(predict_pending(session, segmenter, options, lambda: False))
    session.save_correction("im0", (np.asarray(Image.open(truth / "im0.png")) > 0).astype(np.uint8), done=True)
    pairs = rest_pairs(session, 2, 1)
    assert [p.id for p in pairs] == ["check:im1", "rehearsal:im3", "rehearsal:im4"]  # spread over im1..im4
    assert pairs[0].validate_only and not pairs[0].train_only and all(p.train_only and not p.validate_only for p in pairs[1:])
    probs, labels = session.prediction("im3")
    sure = np.maximum(probs[0], 1 - probs[0]) >= 0.9
    assert np.array_equal(pairs[1].mask, labels) and np.array_equal(pairs[1].weight > 0, sure) and pairs[1].weight.max() == REHEARSAL_WEIGHT
    request = retrain_request(session, tmp_path / "v.safetensors", "v")  # 1 correction: blocks of it, 1 rehearsed, 1 checked
    assert [p.id for p in request.pairs] == ["im0", "check:im2", "rehearsal:im4"] and request.validation == "holdout"
    samples, config = build_samples(request, load_base(request.base), request.config())
    assert "check:im2" in config.val_ids and "rehearsal:im4" not in config.val_ids
    assert all(v.startswith(("im0", "check:")) for v in config.val_ids)
    bare = retrain_request(session, tmp_path / "w.safetensors", "w", rehearse=False, validation="none")
    assert [p.id for p in bare.pairs] == ["im0"]
    session.close()


def test_a_version_no_better_than_the_folder_model_is_not_adopted_and_the_line_names_the_model(tmp_path, trained_checkpoint, user_models_dir):
    import shutil

    from src_models.checkpoint import load_checkpoint, save_checkpoint
    from src_models.user_versions import rename_version

    images, _ = image_folder(tmp_path, count=1)
    session = FolderSession(images)
    user_models_dir.mkdir(parents=True, exist_ok=True)
    current = user_models_dir / "current.safetensors"
    shutil.copyfile(trained_checkpoint, current)
    rename_version(current, "my folder model")
    session.set_model(str(current))
    base = load_checkpoint(trained_checkpoint)
    worse = user_models_dir / "worse.safetensors"
    save_checkpoint(worse, base.build("cpu"), base.config, base.preprocess, base.class_names,
                    {"metrics": {"F1": 0.70}, "metrics_before": {"F1": 0.75}, "parent": str(current)})
    adopted, why = adopt_version(session, str(worse))
    assert not adopted and session.model == str(current)
    assert why.startswith("the new version is no better than my folder model on the validation parts (Dice 0.750 -> 0.700)")
    session.close()
