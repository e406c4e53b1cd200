"""Model files: round trip, hash checks, pickle refusal."""

import json

import pytest
import torch
from model_helpers import TEXT_DIM, randomize_film

from duplus.errors import CheckpointError
from duplus.model import load_model, save_model, sidecar_path


def test_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    randomize_film(tiny_model)
    path = tmp_path / "model.safetensors"
    sidecar = save_model(tiny_model, path, {"text_encoder": {"identity": "fake", "dim": TEXT_DIM}, "steps": 3})
    assert sidecar_path(path) == tmp_path / "model.json"
    on_disk = json.loads((tmp_path / "model.json").read_text(encoding="utf-8"))
    assert on_disk["sha256"] == sidecar["sha256"] and on_disk["steps"] == 3 and on_disk["config"]["text_dim"] == TEXT_DIM
    model, meta = load_model(path, expected_sha256=sidecar["sha256"])
    assert meta["text_encoder"]["identity"] == "fake" and not model.training
    x, ctx, tgt = torch.randn(1, 1, 16, 16, 16), torch.randn(1, TEXT_DIM), torch.randn(2, TEXT_DIM)
    with torch.no_grad():
        assert torch.equal(tiny_model(x, torch.tensor([1]), ctx, tgt), model(x, torch.tensor([1]), ctx, tgt))


def test_altered_or_truncated_weights_are_refused(tiny_model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(tiny_model, path, {})
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_model(path, expected_sha256="0" * 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(path)


def test_missing_sidecar_is_explained(tiny_model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(tiny_model, path, {})
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="sidecar model.json is missing"):
        load_model(path)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickles_are_refused_unless_plain_tensors(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "model.safetensors", {})
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, evil)
    sidecar = json.loads((tmp_path / "model.json").read_text(encoding="utf-8"))
    from duplus.hashing import sha256_file

    (tmp_path / "evil.json").write_text(json.dumps({**sidecar, "sha256": sha256_file(evil)}))
    with pytest.raises(CheckpointError, match="refused to load a pickle"):
        load_model(evil)
    plain = tmp_path / "plain.pt"
    torch.save(tiny_model.state_dict(), plain)
    (tmp_path / "plain.json").write_text(json.dumps({**sidecar, "sha256": sha256_file(plain)}))
    model, _ = load_model(plain)
    assert torch.equal(model.controller.params.weight, tiny_model.controller.params.weight)


def test_inference_windows_come_from_the_model_not_from_an_edited_config():
    from duplus.model import with_trained_window

    config = {"pretrain": {"patch_size": [64, 64, 64], "lr": 0.1}, "inference": {"overlap": 0.5}}
    trained = with_trained_window(config, {"patch_size": [32, 48, 48]})
    assert trained["pretrain"] == {"patch_size": [32, 48, 48], "lr": 0.1}
    assert trained["inference"] == config["inference"]
    assert config["pretrain"]["patch_size"] == [64, 64, 64]  # the caller's config is left alone
    assert with_trained_window(config, {})["pretrain"]["patch_size"] == [64, 64, 64]


def test_weights_of_another_shape_are_a_model_error_naming_the_file(tiny_model, tmp_path):
    from duplus.errors import ModelError

    path = tmp_path / "model.safetensors"
    save_model(tiny_model, path, {})
    sidecar = json.loads((tmp_path / "model.json").read_text(encoding="utf-8"))
    sidecar["config"]["channels"] = [c * 2 for c in sidecar["config"]["channels"]]
    (tmp_path / "model.json").write_text(json.dumps(sidecar), encoding="utf-8")
    with pytest.raises(ModelError, match="model.safetensors: weights do not fit the model in its sidecar"):
        load_model(path)


def test_a_model_saved_before_controller_norm_existed_keeps_its_instance_norm(tmp_path):
    """Same parameter shapes either way: the sidecar decides, and an old one meant an instance norm."""
    from duplus.model import DuPLUS, ModelConfig

    torch.manual_seed(0)
    old = DuPLUS(ModelConfig.from_dict({**ModelConfig.preset("tiny", text_dim=TEXT_DIM).to_dict(),
                                        "controller_norm": "instance"}))
    path = tmp_path / "model.safetensors"
    save_model(old, path, {})
    side = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    del side["config"]["controller_norm"]
    sidecar_path(path).write_text(json.dumps(side), encoding="utf-8")
    model, _ = load_model(path)
    assert model.cfg.controller_norm == "instance"
    assert isinstance(model.controller.image_norm, type(old.controller.image_norm))
