import json

import pytest
import torch

from trainers.checkpoint import WEIGHTS, save_checkpoint
from trainers.models import build_model
from trainers.registry import Registry, RegistryError


def _checkpoint(path, seed=0):
    torch.manual_seed(seed)
    model = build_model("sr", {"num_videos": 5, "num_comments": 7, "text_dim": 8, "hidden": 8, "inner": 16})
    return save_checkpoint(path, "sr", model.config, model.state_dict(), {"valid": {"video": {"ndcg@5": 0.5}}})


@pytest.fixture
def features(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    (folder / "video_emb.npy").write_bytes(b"")  # publish only checks that this is a features folder
    return folder


def test_publish_versions_and_rollback(tmp_path, features):
    reg = Registry(tmp_path / "reg")
    assert reg.current() is None and reg.versions() == []
    v1 = reg.publish(_checkpoint(tmp_path / "a", 0), features)
    v2 = reg.publish(_checkpoint(tmp_path / "b", 1), features)
    assert (v1, v2) == ("v0001", "v0002")
    assert reg.current() == "v0002"
    assert reg.manifest(v1)["metrics"] == {"video": {"ndcg@5": 0.5}}
    assert reg.manifest(v2)["features"] == str(features.resolve())
    assert reg.rollback() == "v0001" and reg.current() == "v0001"
    assert reg.rollback(to="v0002") == "v0002"
    assert [h["action"] for h in reg.history()] == ["publish", "publish", "rollback", "rollback"]
    with pytest.raises(RegistryError, match="no version"):
        reg.rollback(to="v0009")
    # no temporary folder or pointer is left behind
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["CURRENT", "history.jsonl", "versions"]


def test_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path, features):
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "good"), features)
    bad = _checkpoint(tmp_path / "bad")
    (bad / WEIGHTS).write_bytes((bad / WEIGHTS).read_bytes()[:100])
    with pytest.raises(RegistryError, match="refusing to publish"):
        reg.publish(bad, features)
    (bad / "config.json").write_text(json.dumps({"model": "gpt", "config": {}}))
    with pytest.raises(RegistryError, match="unknown model"):
        reg.publish(bad, features)
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"


def test_rollback_with_a_single_version_is_refused(tmp_path, features):
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "a"), features)
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
