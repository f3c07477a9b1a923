"""bioimage.io packages: export (rdf.yaml 0.5, weights, test tensors, cover, docs), read back
(ours as the checkpoint, another tool's through its own steps), bioimage.io's own validator,
and the one-line refusals. Tiny models and synthetic images made here; no network."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import random_checkpoint
from PIL import Image

from src_models.bioimageio import ALOM_2018, export_package, is_package, load_package, read_rdf
from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.errors import R2UNetError
from src_models.inference import Segmenter
from src_models.model_card import Geometry, ModelCard, Postprocess
from src_models.model_names import load_model
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig
from src_models.synthetic import vessel_image

BIOIMAGEIO = Path(sys.executable).with_name("bioimageio")


def _rgb(shape=(150, 170), seed=3) -> np.ndarray:
    image, _ = vessel_image(shape, seed=seed, rgb=True)
    return image


@pytest.fixture(scope="module")
def tiled_package(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pkg")
    ckpt = random_checkpoint(folder / "tiny.safetensors", seed=4)
    return ckpt, export_package(ckpt, folder / "tiny.zip")


def _resize_checkpoint(path: Path) -> Path:
    torch.manual_seed(1)
    config = ModelConfig(arch="r2unet", in_channels=3, widths=(4, 8, 16))
    card = ModelCard(task="skin lesion", data="ISIC 2017 Task 1 train (synthetic stand-in)", licence="weights: BSD-3-Clause",
                     geometry=Geometry("resize", 60), tta=True, postprocess=Postprocess("largest_component", 1, True))
    save_checkpoint(path, build_model(config), config, PreprocessConfig(channels="rgb"), ["lesion"], {"name": "tiny-skin"}, card)
    return path


def _rewrite(package: Path, out: Path, edit=None, drop=()) -> Path:
    """A copy of ``package`` with its rdf.yaml edited by ``edit(rdf)`` and members ``drop`` left out."""
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            if name in drop:
                continue
            data = source.read(name)
            if name == "rdf.yaml" and edit is not None:
                rdf = yaml.safe_load(data)
                edit(rdf)
                data = yaml.safe_dump(rdf).encode()
            target.writestr(name, data)
    return out


def _foreign(rdf: dict) -> None:
    """What another tool's package of the same network looks like: no napari-r2unet config, no checkpoint."""
    rdf.pop("config")
    rdf.pop("attachments")


def test_export_writes_a_complete_spec_05_package(tiled_package):
    ckpt, package = tiled_package
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        for descr in (rdf["weights"]["onnx"], rdf["weights"]["torchscript"], rdf["inputs"][0]["test_tensor"],
                      rdf["outputs"][0]["test_tensor"], rdf["attachments"][0]):
            assert hashlib.sha256(archive.read(descr["source"])).hexdigest() == descr["sha256"]
        test_in = np.load(io.BytesIO(archive.read("test_input.npy")))
        test_out = np.load(io.BytesIO(archive.read("test_output.npy")))
        cover = Image.open(io.BytesIO(archive.read("cover.png")))
        readme = archive.read("README.md").decode()
        attached = archive.read("tiny.safetensors")
    assert {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", "weights.onnx",
            "weights_torchscript.pt", "tiny.safetensors"} <= names
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    assert ALOM_2018["doi"] in [c.get("doi") for c in rdf["cite"]]
    assert rdf["license"] == "BSD-3-Clause" and rdf["documentation"] == "README.md" and rdf["covers"] == ["cover.png"]
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"]] == ["scale_range", "clip"]
    assert rdf["inputs"][0]["axes"][1]["channel_names"] == ["R", "G", "B"]  # a green model takes RGB and picks green itself
    assert test_in.shape == (1, 3, 256, 256) and test_out.shape == (1, 1, 256, 256)
    assert test_out.min() >= 0 and test_out.max() <= 1
    assert cover.size[0] == 2 * cover.size[1]
    assert "## Validation" in readme and "Alom" in readme
    assert attached == ckpt.read_bytes()  # the very checkpoint: its SHA-256 keeps the lineage


def test_test_output_is_what_our_pipeline_gives(tiled_package):
    ckpt, package = tiled_package
    with zipfile.ZipFile(package) as archive:
        test_in = np.load(io.BytesIO(archive.read("test_input.npy")))
        test_out = np.load(io.BytesIO(archive.read("test_output.npy")))
    ours = Segmenter(load_checkpoint(ckpt), "cpu", backend="torch").predict(test_in[0], channel_axis=0)
    np.testing.assert_allclose(ours, test_out[0], atol=1e-5)


def test_our_package_comes_back_as_the_checkpoint(tiled_package):
    ckpt, package = tiled_package
    back = load_model(str(package))
    assert back.package is None and back.sha256 == load_checkpoint(ckpt).sha256
    image = _rgb()
    np.testing.assert_array_equal(Segmenter(back, "cpu").predict(image), Segmenter(load_checkpoint(ckpt), "cpu").predict(image))


@pytest.mark.parametrize("strip", [True, False])
def test_another_tools_package_runs_with_its_own_steps(tiled_package, tmp_path, strip, monkeypatch):
    """Without our config and checkpoint the package runs through its rdf.yaml alone (ONNX, its
    preprocessing, our tiler): the same probabilities to 1e-3, on a size that is no multiple of the step.
    Its onnxruntime session keeps the caller's thread budget, its workers asleep after a run, as ours."""
    import onnxruntime as ort

    sessions, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *args, **kwargs: sessions.append(real(*args, **kwargs)) or sessions[-1])
    ckpt, package = tiled_package
    edit = _foreign if strip else (lambda rdf: (_foreign(rdf), rdf["weights"].pop("onnx")))
    foreign = _rewrite(package, tmp_path / "foreign.zip", edit, drop=("tiny.safetensors",) + (() if strip else ("weights.onnx",)))
    checkpoint = load_model(str(foreign))
    assert checkpoint.package is not None and checkpoint.package.weights_format == ("onnx" if strip else "torchscript")
    image = _rgb((300, 270))
    reference = Segmenter(load_checkpoint(ckpt), "cpu").predict(image)
    segmenter, ours = Segmenter(checkpoint, "cpu"), len(sessions)
    got = segmenter.predict(image)
    package_sessions = sessions[ours:]
    assert segmenter.backend.startswith("bioimageio")
    assert got.shape == reference.shape and np.abs(got - reference).max() < 1e-3
    tiles = segmenter.predict(image, tile=160)  # tiled with the package's step and our overlap, as ours tiles
    assert np.abs(tiles - Segmenter(load_checkpoint(ckpt), "cpu").predict(image, tile=160)).max() < 1e-3
    with pytest.raises(R2UNetError, match="bioimage.io package from another tool"):
        checkpoint.build()
    assert len(package_sessions) == (1 if strip else 0) and sessions
    for session in sessions:
        options = session.get_session_options()
        assert options.intra_op_num_threads == torch.get_num_threads()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_format_04_package_runs(tiled_package, tmp_path):
    ckpt, package = tiled_package

    def to_04(rdf):
        _foreign(rdf)
        rdf["format_version"] = "0.4.10"
        rdf["inputs"] = [{"name": "input0", "axes": "bcyx", "data_type": "float32", "shape": {"min": [1, 3, 64, 64], "step": [0, 0, 4, 4]},
                          "preprocessing": [{"name": "scale_range", "kwargs": {"mode": "per_sample", "axes": "xy",
                                                                                "min_percentile": 1, "max_percentile": 99}},
                                            {"name": "clip", "kwargs": {"min": -1, "max": 2}}]}]
        rdf["outputs"] = [{"name": "output0", "axes": "bcyx", "data_type": "float32", "halo": [0, 0, 16, 16],
                           "shape": {"reference_tensor": "input0", "scale": [1, 0, 1, 1], "offset": [0, 0.5, 0, 0]}}]

    old = load_model(str(_rewrite(package, tmp_path / "old.zip", to_04, drop=("tiny.safetensors",))))
    assert (old.package.min_size, old.package.step, old.package.halo) == (64, 4, 16)
    image = _rgb()
    assert np.abs(Segmenter(old, "cpu").predict(image) - Segmenter(load_checkpoint(ckpt), "cpu").predict(image)).max() < 1e-3


def test_a_resize_model_exports_a_fixed_input_and_says_what_the_spec_cannot(tmp_path):
    ckpt = _resize_checkpoint(tmp_path / "skin.safetensors")
    package = export_package(ckpt, tmp_path / "skin.zip")
    rdf, files = read_rdf(package)
    sizes = [a.get("size") for a in rdf["inputs"][0]["axes"] if a["type"] == "space"]
    assert sizes == [60, 60]  # the card's 60 px is already a multiple of 4
    readme = files.read("README.md").decode()
    assert "letterbox" in readme and "test-time augmentation" in readme and "largest component, holes filled" in readme
    assert any("ISIC" in c["text"] for c in rdf["cite"])
    back = load_package(package)
    assert back.model_card.geometry == Geometry("resize", 60) and back.model_card.tta
    image = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(Segmenter(back, "cpu").predict(image), Segmenter(load_checkpoint(ckpt), "cpu").predict(image))


def test_a_fixed_size_foreign_package_tiles_at_that_size(tmp_path):
    ckpt = _resize_checkpoint(tmp_path / "skin.safetensors")
    foreign = _rewrite(export_package(ckpt, tmp_path / "skin.zip"), tmp_path / "fixed.zip", _foreign, drop=("skin.safetensors",))
    checkpoint = load_model(str(foreign))
    assert checkpoint.package.fixed == 60
    probs = Segmenter(checkpoint, "cpu").predict((np.random.default_rng(1).random((100, 75, 3)) * 255).astype(np.uint8))
    assert probs.shape == (1, 100, 75) and probs.min() >= 0 and probs.max() <= 1


@pytest.mark.skipif(not BIOIMAGEIO.is_file(), reason="bioimageio.core is not installed (pip install -e '.[test]')")
def test_bioimageio_own_validator_passes_offline(tiled_package, tmp_path):
    _, package = tiled_package
    env = {**os.environ, "BIOIMAGEIO_PERFORM_IO_CHECKS": "false", "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "cache"),
           "NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # no network
    run = subprocess.run([str(BIOIMAGEIO), "test", str(package)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout


def test_cli_export_and_predict_give_the_same_mask(tiled_package, tmp_path):
    from src_models.cli import main

    ckpt, _ = tiled_package
    image = tmp_path / "im.png"
    Image.fromarray(_rgb((140, 120))).save(image)
    assert main(["export", str(ckpt), "--format", "bioimageio", "--out", str(tmp_path / "x.zip")]) == 0
    assert main(["export", str(ckpt), "--format", "bioimageio", "--out", str(tmp_path / "x.zip")]) == 1  # exists: refused
    for model, out in ((str(ckpt), "a"), (str(tmp_path / "x.zip"), "b")):
        assert main(["predict", model, str(image), "--out", str(tmp_path / out), "--save-prob"]) == 0
    import tifffile

    masks = [tifffile.imread(tmp_path / d / "im.tif") for d in "ab"]
    probs = [tifffile.imread(tmp_path / d / "im_prob.tif") for d in "ab"]
    assert masks[0].shape == (140, 120) and np.array_equal(*masks)
    assert np.abs(probs[0].astype(np.float32) - probs[1].astype(np.float32)).max() < 1e-3


def test_bad_packages_get_one_line_reasons(tiled_package, tmp_path):
    _, package = tiled_package
    cases = {
        "not a zip": (tmp_path / "junk.zip", "complete .zip"),
        "no rdf": (tmp_path / "empty.zip", "without an rdf.yaml"),
        "a dataset": (_rewrite(package, tmp_path / "ds.zip", lambda r: r.update(type="dataset")), "not a model"),
        "3D": (_rewrite(package, tmp_path / "z.zip", lambda r: (_foreign(r), r["inputs"][0]["axes"].append({"type": "space", "id": "z", "size": 8}))), "3D"),
        "two outputs": (_rewrite(package, tmp_path / "two.zip", lambda r: (_foreign(r), r["outputs"].append(dict(r["outputs"][0])))), "one of each"),
        "state dict only": (_rewrite(package, tmp_path / "sd.zip", lambda r: (_foreign(r), r.update(weights={"pytorch_state_dict": {"source": "w.pt"}}))), "Python code"),
        "damaged": (_rewrite(package, tmp_path / "bad.zip", lambda r: r["attachments"][0].update(sha256="0" * 64)), "damaged"),
        "url": (_rewrite(package, tmp_path / "url.zip", lambda r: (_foreign(r), r["weights"]["onnx"].update(source="https://example.org/w.onnx"))), "network"),
        "missing": (tmp_path / "nowhere.zip", "does not exist"),
        "multi-class": (_rewrite(package, tmp_path / "k.zip", lambda r: (_foreign(r), r["outputs"][0]["axes"][1].update(channel_names=["a", "b"]))), "single-class"),
    }
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("README.md", "hello")
    for what, (path, message) in cases.items():
        with pytest.raises(R2UNetError, match=message) as info:
            load_model(str(path))
        assert "\n" not in str(info.value), what


def test_export_refuses_what_it_cannot_describe(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(arch="unet", widths=(4, 8))
    path = tmp_path / "z.safetensors"
    save_checkpoint(path, build_model(config), config, PreprocessConfig(normalize="zscore"), ["vessel"])
    with pytest.raises(R2UNetError, match="cannot express"):
        export_package(path, tmp_path / "z.zip")
    assert not (tmp_path / "z.zip").exists()
    with pytest.raises(R2UNetError, match=r"\.zip"):
        export_package(random_checkpoint(tmp_path / "t.safetensors"), tmp_path / "t.onnx")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind


def test_is_package():
    assert is_package("a/b.zip") and is_package("x/rdf.yaml") and is_package("bioimageio.yaml")
    assert not is_package("m.safetensors") and not is_package("r2unet-drive")


def test_a_package_folder_reads_like_its_zip(tiled_package, tmp_path):
    ckpt, package = tiled_package
    with zipfile.ZipFile(package) as archive:
        archive.extractall(tmp_path / "unpacked")
    back = load_model(str(tmp_path / "unpacked" / "rdf.yaml"))
    assert back.sha256 == load_checkpoint(ckpt).sha256
    shutil.rmtree(tmp_path / "unpacked")


@pytest.mark.slow
@pytest.mark.skipif(not BIOIMAGEIO.is_file(), reason="bioimageio.core is not installed (pip install -e '.[test]')")
def test_r2unet_drive_exports_passes_bioimageio_test_and_predicts_the_same(tmp_path):
    """The issue's acceptance: r2unet-drive as a package passes bioimage.io's validator offline, and
    running the package (as another tool's, without our checkpoint) gives r2unet-drive's probabilities."""
    package = export_package("r2unet-drive", tmp_path / "x.zip")
    env = {**os.environ, "BIOIMAGEIO_PERFORM_IO_CHECKS": "false", "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "cache"),
           "NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    run = subprocess.run([str(BIOIMAGEIO), "test", str(package)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    foreign = _rewrite(package, tmp_path / "foreign.zip", _foreign, drop=("r2unet-drive.safetensors",))
    image = _rgb((400, 380), seed=9)
    reference = Segmenter(load_model("r2unet-drive"), "cpu").predict(image)
    assert np.abs(Segmenter(load_model(str(foreign)), "cpu").predict(image) - reference).max() < 1e-3
    assert np.array_equal(Segmenter(load_model(str(package)), "cpu").predict(image), reference)


def test_another_tools_package_cannot_be_fine_tuned_or_re_exported(tiled_package, tmp_path):
    from src_models.finetune import load_base

    foreign = _rewrite(tiled_package[1], tmp_path / "foreign.zip", _foreign, drop=("tiny.safetensors",))
    for action in (lambda: load_base(str(foreign)), lambda: export_package(str(foreign), tmp_path / "again.zip")):
        with pytest.raises(R2UNetError, match="from another tool|already"):
            action()
