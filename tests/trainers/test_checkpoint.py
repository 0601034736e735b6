import dataclasses
import json

import pytest
import torch

from trainers.checkpoint import CheckpointError, load_model, read_model_config, save_checkpoint
from trainers.models import ModelSize, SASRec, SASRecConfig, SRConfig, SRModel


def saved(tmp_path):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_videos=5, num_comments=6, size=ModelSize(hidden=8, inner=16)))
    save_checkpoint(tmp_path, "sasrec", model.config, model.state_dict(), {"epochs_run": 1})
    return model


def test_round_trip(tmp_path):
    model = saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "train.json"]
    assert read_model_config(tmp_path) == ("sasrec", dataclasses.asdict(model.config))
    kind, loaded = load_model(tmp_path)
    assert kind == "sasrec" and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_corrupt_weights_are_refused(tmp_path):
    saved(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)


def test_incompatible_or_missing_files_are_refused(tmp_path):
    saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["size"]["hidden"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": "gpt", "config": {}}))
    with pytest.raises(CheckpointError, match="unknown model"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "nowhere")


def test_a_config_with_flat_size_fields_still_loads(tmp_path):
    """config.json as written before ModelSize: hidden, num_layers, ... beside the other fields."""
    torch.manual_seed(0)
    model = SRModel(SRConfig(num_videos=5, num_comments=6, text_dim=4, size=ModelSize(hidden=8, inner=16)))
    save_checkpoint(tmp_path, "sr", model.config, model.state_dict())
    data = json.loads((tmp_path / "config.json").read_text())
    size = data["config"].pop("size")
    data["config"].update(size)
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert read_model_config(tmp_path) == ("sr", dataclasses.asdict(model.config))
    kind, loaded = load_model(tmp_path)
    assert kind == "sr" and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    data["config"]["size"] = size  # both shapes at once: refused, naming the stray keys
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="hidden"):
        load_model(tmp_path)
