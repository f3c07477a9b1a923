"""Checkpoints: bit-exact round trip, metadata, and refusal of broken or hostile files."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from src_models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from src_models.errors import R2UNetError
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig


def _save(path: Path, **provenance) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    config = ModelConfig(arch="runet", widths=(4, 8), t=3, in_channels=3)
    model = build_model(config)
    model.encoder[0].r1.norms[1].running_mean.uniform_()  # buffers round-trip too
    save_checkpoint(path, model, config, PreprocessConfig(channels="rgb", normalize="zscore"), ["vessel"], provenance)
    return model, config


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "m.safetensors"
    model, config = _save(path, epochs=3, metrics={"F1": 0.8}, parent_sha256="abc")
    ck = load_checkpoint(path)
    assert ck.config == config
    assert ck.preprocess == PreprocessConfig(channels="rgb", normalize="zscore")
    assert ck.class_names == ("vessel",)
    assert ck.provenance["epochs"] == 3 and ck.provenance["metrics"] == {"F1": 0.8}
    assert ck.provenance["parent_sha256"] == "abc" and "package_version" in ck.provenance and "created" in ck.provenance
    reference = model.state_dict()
    assert set(ck.state_dict) == set(reference)
    for key, tensor in reference.items():
        assert ck.state_dict[key].dtype == tensor.dtype
        assert torch.equal(ck.state_dict[key], tensor), key
    rebuilt = ck.build()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert ck.sha256 == file_sha256(path)


def test_loading_never_modifies_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _save(path)
    before = (file_sha256(path), path.stat().st_mtime_ns)
    load_checkpoint(path).build()
    assert (file_sha256(path), path.stat().st_mtime_ns) == before


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    _save(path)
    original = file_sha256(path)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(R2UNetError, match="No space left"):
        _save(path)
    assert file_sha256(path) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    config = ModelConfig(widths=(4, 8))
    model = build_model(config)
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "p.safetensors", prefixed, config, PreprocessConfig(), ["fg"])
    assert set(load_checkpoint(tmp_path / "p.safetensors").state_dict) == set(model.state_dict())


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    _save(path)
    return path


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(R2UNetError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(R2UNetError, match="not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -50, -1])
def test_truncated_files_are_refused(good, keep):
    data = good.read_bytes()
    good.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(R2UNetError) as exc:
        load_checkpoint(good)
    _assert_one_line_naming(exc, good)


def test_bit_flip_in_weights_is_detected(good):
    data = bytearray(good.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    position = 8 + header_len + (len(data) - 8 - header_len) // 2
    data[position] ^= 0x10
    good.write_bytes(bytes(data))
    with pytest.raises(R2UNetError, match="corrupt|NaN") as exc:
        load_checkpoint(good)
    _assert_one_line_naming(exc, good)


@pytest.mark.parametrize("offset", [8, 20, 60, 200])
def test_bit_flips_in_header_are_refused(good, offset):
    data = bytearray(good.read_bytes())
    data[offset] ^= 0xFF
    good.write_bytes(bytes(data))
    try:
        ck = load_checkpoint(good)
    except R2UNetError as exc:
        assert "\n" not in str(exc)
    else:  # a flip inside a free-text field can leave a valid file: it must still be consistent
        ck.build()


def test_gigantic_header_claim(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(R2UNetError, match="header claims"):
        load_checkpoint(path)


def test_garbage_and_empty(tmp_path):
    for name, payload in [("garbage.safetensors", os.urandom(4096)), ("empty.safetensors", b""), ("text.safetensors", b"hello world, not weights")]:
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(R2UNetError) as exc:
            load_checkpoint(path)
        _assert_one_line_naming(exc, path)


def test_plain_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(R2UNetError, match="no napari-r2unet metadata"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    config = ModelConfig(widths=(4, 8))
    other = build_model(ModelConfig(widths=(4, 16)))
    save_checkpoint(tmp_path / "x.safetensors", other, ModelConfig(widths=(4, 16)), PreprocessConfig(), ["fg"])
    # rewrite the metadata so the config lies about the widths
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta["config"] = config.to_json()
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata=meta)
    with pytest.raises(R2UNetError, match="do not match its r2unet config.*wrong shape"):
        load_checkpoint(tmp_path / "lie.safetensors")


def test_invalid_metadata_json(good, tmp_path):
    from safetensors import safe_open

    with safe_open(str(good), "pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in [("config", "{not json"), ("config", json.dumps({"arch": "nope"})), ("format_version", "99"), ("preprocess", json.dumps({"channels": "x"}))]:
        bad = tmp_path / f"bad_{key}.safetensors"
        save_file(tensors, str(bad), metadata={**meta, key: value})
        with pytest.raises(R2UNetError) as exc:
            load_checkpoint(bad)
        _assert_one_line_naming(exc, bad)


def test_nan_weights_are_refused(tmp_path):
    config = ModelConfig(widths=(4, 8))
    state = build_model(config).state_dict()
    state["head.weight"][:] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, state, config, PreprocessConfig(), ["fg"])
    with pytest.raises(R2UNetError, match="NaN"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_pickle_payload_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"config": {}, "state_dict": {}, "x": _Exploit(marker)}, str(path)) if suffix != ".safetensors" else path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(R2UNetError) as exc:
        load_checkpoint(path)
    _assert_one_line_naming(exc, path)
    assert not marker.exists(), "loading ran code from the file"


def test_legacy_pt_with_config_loads(tmp_path):
    config = ModelConfig(widths=(4, 8))
    model = build_model(config)
    path = tmp_path / "old.pt"
    torch.save({"config": config.to_dict(), "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, str(path))
    ck = load_checkpoint(path)
    assert ck.config == config
    torch.save(model.state_dict(), str(tmp_path / "bare.pt"))
    with pytest.raises(R2UNetError, match="must be a dict with 'config' and 'state_dict'"):
        load_checkpoint(tmp_path / "bare.pt")


@pytest.mark.parametrize("cut", [1, 100, "half"])
def test_a_truncated_copy_is_refused_when_it_is_chosen_not_at_segment(good, cut):
    from src_models import checkpoint_files

    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    keep = len(data) - cut if cut != "half" else 8 + header_len + (len(data) - 8 - header_len) // 2
    assert keep > 8 + header_len, "the cut falls in the tensor data: the header alone still reads"
    good.write_bytes(data[:keep])
    message = f"checkpoint {good} is truncated or damaged ({keep} of {len(data)} bytes); copy it again"
    for read in (checkpoint_files.describe, checkpoint_files.read_metadata, load_checkpoint):  # the model menu calls describe
        with pytest.raises(R2UNetError) as exc:
            read(good)
        assert str(exc.value) == message


def test_trailing_bytes_are_damage_too(good):
    from src_models import checkpoint_files

    size = good.stat().st_size
    with open(good, "ab") as handle:
        handle.write(b"\0" * 16)
    with pytest.raises(R2UNetError, match=rf"truncated or damaged \({size + 16} of {size} bytes\)"):
        checkpoint_files.describe(good)


def test_a_text_file_named_safetensors_is_not_a_checkpoint(tmp_path):
    from src_models import checkpoint_files

    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes about the models, not weights\n" * 4)
    for read in (checkpoint_files.describe, load_checkpoint):
        with pytest.raises(R2UNetError) as exc:
            read(path)
        assert str(exc.value) == f"{path} is not a checkpoint (.safetensors) file; choose a model saved by r2unet or the Fine-tune widget"
