"""The r2unet command line: help, JSON outputs, predict/evaluate outputs, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from src_models.cli import main
from src_models.label_files import read_label_file
from src_models.synthetic import vessel_image

SUBCOMMANDS = ["models", "info", "predict", "evaluate", "train", "finetune", "export"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: r2unet " + command in capsys.readouterr().out


def test_models_json(capsys):
    code, out, _ = run(capsys, "models", "--json")
    data = json.loads(out)
    assert code == 0 and [a["name"] for a in data["architectures"]] == ["unet", "resunet", "runet", "r2unet"]
    assert isinstance(data["pretrained"], list)


def test_info_prints_parameter_parity(capsys):
    code, out, _ = run(capsys, "info", "--json")
    rows = {r["arch"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"unet", "resunet", "runet", "r2unet"}
    for arch in ("runet", "r2unet"):
        assert abs(rows[arch]["parameters"] / rows["unet"]["parameters"] - 1) <= 0.15
        assert rows[arch]["gflops_per_megapixel"] > 2 * rows["unet"]["gflops_per_megapixel"]
    code, out, _ = run(capsys, "info")
    assert "vs U-Net" in out and "r2unet" in out
    code, out, _ = run(capsys, "info", "r2unet", "--widths", "8,16", "--t", "3", "--json")
    assert json.loads(out)["config"]["widths"] == [8, 16] and json.loads(out)["config"]["t"] == 3


def test_info_of_a_checkpoint_shows_provenance(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "info", str(tiny_checkpoint), "--json")
    data = json.loads(out)
    assert code == 0 and data["config"]["widths"] == [4, 8, 16] and "package_version" in data["provenance"] and len(data["sha256"]) == 64


def test_info_shows_long_id_lists_as_their_count_and_ends(capsys, tmp_path):
    from conftest import random_checkpoint

    from src_models.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(random_checkpoint(tmp_path / "a.safetensors"))
    ids = [f"img{i:04d}" for i in range(500)]
    path = tmp_path / "b.safetensors"
    save_checkpoint(path, ck.state_dict, ck.config, ck.preprocess, ck.class_names, {"training_data": {"train_ids": ids, "sources": ["x"]}})
    code, out, _ = run(capsys, "info", str(path))
    assert code == 0 and 'training_data: {"sources": ["x"], "train_ids": [500 items: "img0000", "img0001", "img0002", ..., "img0499"]}' in out
    code, out, _ = run(capsys, "info", str(path), "--json")
    assert json.loads(out)["provenance"]["training_data"]["train_ids"] == ids  # whole in JSON

@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(2):
        img, _ = vessel_image((70, 90), seed=seed, rgb=True)
        tifffile.imwrite(folder / f"{seed + 1:02d}_test.tif", img, compression="lzw")
    return folder


def test_predict_writes_masks_and_probabilities(capsys, tiny_checkpoint, image_folder, tmp_path):
    out_dir = tmp_path / "out" / "nested"
    code, out, err = run(capsys, "predict", str(tiny_checkpoint), str(image_folder), "--out", str(out_dir), "--save-prob", "--tile", "32")
    assert code == 0, err
    mask = tifffile.imread(out_dir / "01_test.tif")
    prob = tifffile.imread(out_dir / "01_test_prob.tif")
    assert mask.shape == prob.shape == (70, 90) and mask.dtype == np.uint8 and prob.dtype == np.float32
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask > 0, prob >= 0.5)
    assert sorted(p.name for p in out_dir.iterdir()) == ["01_test.tif", "01_test_prob.tif", "02_test.tif", "02_test_prob.tif"]
    labels, header = read_label_file(out_dir / "01_test.tif")  # our label file: napari opens it as Labels, 0/1
    assert np.array_equal(labels, mask > 0) and header["binary"] is True
    assert header["image"] == str(image_folder / "01_test.tif") and header["threshold"] == 0.5 and header["model"]
    assert header["postprocess"]["kind"] in ("none", "largest_component", "largest_components") and len(header["model_sha256"]) == 64


def test_predict_freezes_the_start_up_objects_only_while_it_runs(capsys, tiny_checkpoint, image_folder, tmp_path, monkeypatch):
    """The collector skips start-up's objects during the run (no full collection over torch inside
    the first image) and gets them all back after: a program calling main() again loses nothing."""
    import gc

    from src_models import inference

    seen = []
    real_predict = inference.Segmenter.predict
    monkeypatch.setattr(inference.Segmenter, "predict", lambda self, *a, **k: seen.append(gc.get_freeze_count()) or real_predict(self, *a, **k))
    assert gc.get_freeze_count() == 0
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image_folder), "--out", str(tmp_path / "out"), "--tile", "32")
    assert code == 0, err
    assert seen and min(seen) > 10_000  # torch alone is >100,000 objects
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller that froze its own objects: main() leaves them frozen
    try:
        frozen = gc.get_freeze_count()
        assert run(capsys, "predict", str(tiny_checkpoint), str(image_folder), "--out", str(tmp_path / "out2"), "--tile", "32")[0] == 0
        assert 0.9 * frozen < gc.get_freeze_count() <= frozen  # neither unfrozen nor frozen more (some frozen objects die)
    finally:
        gc.unfreeze()


def test_predict_stack_and_multiclass(capsys, tmp_path):
    from conftest import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "multi.safetensors", out_channels=3)
    stack = np.stack([vessel_image((40, 48), seed=s)[0] for s in range(5)])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    code, _, err = run(capsys, "predict", str(ckpt), str(tmp_path / "stack.tif"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    labels = tifffile.imread(tmp_path / "o" / "stack.tif")
    assert labels.shape == (5, 40, 48) and labels.max() <= 2


def test_evaluate_json(capsys, tiny_checkpoint, image_folder, tmp_path):
    masks, fov = tmp_path / "manual", tmp_path / "fov"
    masks.mkdir()
    fov.mkdir()
    for seed in range(2):
        _, m = vessel_image((70, 90), seed=seed, rgb=True)
        Image.fromarray(m * 255).save(masks / f"{seed + 1:02d}_manual1.gif")
        Image.fromarray(np.full((70, 90), 255, np.uint8)).save(fov / f"{seed + 1:02d}_test_mask.gif")
    code, out, err = run(capsys, "evaluate", str(tiny_checkpoint), "--images", str(image_folder), "--masks", str(masks), "--fov", str(fov), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [i["id"] for i in data["images"]] == ["01", "02"]
    assert set(data["pooled"]) == {"F1", "SE", "SP", "ACC", "JS", "AUC"}
    assert sum(data["confusion"].values()) == 2 * 70 * 90
    code, out, _ = run(capsys, "evaluate", str(tiny_checkpoint), "--images", str(image_folder), "--masks", str(masks))
    assert code == 0 and out.splitlines()[-1].startswith("pooled")


ERROR_CASES = [
    (["predict", "r2unet", "x.png", "--out", "o"], "architecture without trained weights"),
    (["predict", "no-such-model", "x.png", "--out", "o"], "is neither a pretrained model"),
    (["predict", "missing.safetensors", "x.png", "--out", "o"], "does not exist"),
    (["evaluate", "missing.safetensors", "--images", "nowhere", "--masks", "nowhere"], "does not exist"),
    (["info", "r2unet", "--widths", "8,-1"], "widths"),
]


@pytest.mark.parametrize(("argv", "message"), ERROR_CASES)
def test_errors_are_one_line_with_nonzero_exit(capsys, tmp_path, argv, message):
    os.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("r2unet: error: ") and message in err
    assert "Traceback" not in err


def test_corrupt_checkpoint_and_image_errors(capsys, tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:300])
    (tmp_path / "img.png").write_bytes(b"not an image")
    code, _, err = run(capsys, "predict", str(bad), str(tmp_path / "img.png"), "--out", str(tmp_path / "o"))
    # issue 12: a truncated copy is named as such, with what to do (was "cannot load checkpoint ...")
    assert code == 1 and f"checkpoint {bad} is truncated or damaged" in err and "copy it again" in err and err.count("\n") == 1
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(tmp_path / "img.png"), "--out", str(tmp_path / "o"))
    assert code == 1 and "cannot read" in err and err.count("\n") == 1


def test_mismatched_mask_shape_is_named(capsys, tmp_path, tiny_checkpoint, image_folder):
    masks = tmp_path / "m"
    masks.mkdir()
    for i in (1, 2):
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / f"{i:02d}_manual1.gif")
    code, _, err = run(capsys, "evaluate", str(tiny_checkpoint), "--images", str(image_folder), "--masks", str(masks))
    assert code == 1 and "01_manual1.gif" in err and "(70, 90)" in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "m", "x", "--out", "o", "--overlap", "1.5"])
    assert exc.value.code == 2


def test_console_script_runs_without_importing_torch_for_help(tmp_path):
    exe = shutil.which("r2unet", path=str(Path(sys.executable).parent))
    assert exe, "the r2unet console script is installed"
    result = subprocess.run([exe, "predict", "r2unet", "nothing.png", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    probe = "import sys; from src_models.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip() == "False"


def test_train_finetune_resume_and_predict(capsys, tmp_path, train_folders):
    images, masks = train_folders
    out = tmp_path / "m.safetensors"
    common = ["--images", str(images), "--masks", str(masks), "--patch-size", "32", "--batch-size", "2", "--steps-per-epoch", "2"]
    code, stdout, err = run(capsys, "train", "r2unet", *common, "--out", str(out), "--widths", "4,8", "--epochs", "1", "--val-fraction", "0.34", "--fn-weight", "0.7")
    assert code == 0, err
    assert "epoch 1/1" in stdout and "finished" in stdout
    code, _, err = run(capsys, "train", "r2unet", *common, "--out", str(out), "--widths", "4,8", "--epochs", "2", "--val-fraction", "0.34", "--fn-weight", "0.7", "--resume")
    assert code == 0, err
    assert resumed_steps(out) == 4
    corrections = tmp_path / "corr"
    corrections.mkdir()
    for seed in range(2):  # the third image has no correction map: it keeps weight 1
        Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 28)).save(corrections / f"{seed}.png")
    tuned = tmp_path / "tuned.safetensors"
    code, _, err = run(capsys, "finetune", str(out), *common, "--out", str(tuned), "--epochs", "1", "--corrections", str(corrections))
    assert code == 0, err
    code, stdout, err = run(capsys, "info", str(tuned), "--json")
    provenance = json.loads(stdout)["provenance"]
    assert provenance["parent"] == "m" and provenance["train_config"]["fn_weight"] == 0.7  # the base's loss, inherited
    code, _, err = run(capsys, "finetune", str(out), *common, "--out", str(out))
    assert code == 1 and "never overwritten" in err


def resumed_steps(path: Path) -> int:
    import torch

    from src_models.training import resume_path

    return torch.load(resume_path(path), weights_only=True)["state"]["step"]


def test_training_errors_are_one_line(capsys, tmp_path, train_folders):
    images, masks = train_folders
    Image.fromarray(np.array([[0, 1, 2, 3]] * 4, np.uint8)).save(masks / "0.png")
    code, _, err = run(capsys, "train", "unet", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and err.count("\n") == 1 and "values 0, 1, 2, 3" in err
    code, _, err = run(capsys, "train", "unet", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "m.safetensors"), "--resume")
    assert code == 1 and err.count("\n") == 1
    code, _, err = run(capsys, "train", "unet", "--images", str(tmp_path / "none"), "--masks", str(masks), "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and "does not exist" in err


def test_training_help_reads_its_defaults_from_the_config(capsys):
    from src_models.training import FINETUNE_DEFAULTS, TrainConfig

    for command, lr, epochs, batch in (("train", TrainConfig().lr, TrainConfig().epochs, TrainConfig().batch_size),
                                       ("finetune", FINETUNE_DEFAULTS["lr"], FINETUNE_DEFAULTS["epochs"], FINETUNE_DEFAULTS["batch_size"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"cosine decay) (default: {lr:g})" in text and f"epoch limit (default: {epochs} when --minutes is not given either)" in text, text
        assert f"both: whichever ends first; neither: {epochs} epochs" in text
        assert f"torchrun) (default: {batch})" in text
    assert "(default: bn)" in text and "steps per epoch (default: 25)" in text


def test_an_error_while_the_session_builds_exits_cleanly(tmp_path):
    """The CLI fails on the image while onnxruntime still builds the session in its background
    thread (a fresh cache: it optimises the graph, about a second for full widths): the process
    must wait for it and exit with the one-line error, not abort inside onnxruntime's C++."""
    from conftest import random_checkpoint

    checkpoint = random_checkpoint(tmp_path / "full.safetensors", widths=(16, 32, 64, 128, 256))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not an image")
    env = {**os.environ, "R2UNET_CACHE_DIR": str(tmp_path / "cache"), "R2UNET_PRECISION": "fp32"}
    code = f"import sys; from src_models.cli import main; sys.exit(main(['predict', {str(checkpoint)!r}, {str(bad)!r}, '--out', {str(tmp_path / 'out')!r}]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cannot read" in result.stderr and "terminate called" not in result.stderr
