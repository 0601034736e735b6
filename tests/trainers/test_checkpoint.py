import json

import pytest
import torch

from trainers.checkpoint import CheckpointError, load_model, read_model_config, save_checkpoint
from trainers.models import SASRec, SASRecConfig


def saved(tmp_path, **config):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_videos=5, num_comments=6, hidden=8, inner=16, **config))
    save_checkpoint(tmp_path, "sasrec", model.config, model.state_dict(), {"epochs_run": 1})
    return model


def test_round_trip(tmp_path):
    model = saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "train.json"]
    assert read_model_config(tmp_path) == ("sasrec", {**model.config.__dict__})
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
    config["config"]["hidden"] = 16
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
