import json

import pytest
import torch

from trainers.checkpoint import WEIGHTS, save_checkpoint
from trainers.models import build_model
from trainers.registry import Registry, RegistryError


def _checkpoint(path, seed=0):
    torch.manual_seed(seed)
    model = build_model("sr", {"num_videos": 5, "num_comments": 7, "text_dim": 8,
                                "size": {"hidden": 8, "inner": 16}})
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


@pytest.fixture
def serving_files(tmp_path):
    """A features folder with every file an object-storage registry copies (contents need not be real)."""
    from trainers.registry import SERVING_FEATURES

    folder = tmp_path / "features-full"
    folder.mkdir()
    for i, name in enumerate(SERVING_FEATURES):
        (folder / name).write_bytes(f"{name} {i}".encode() * 100)
    return folder


def test_object_storage_registry(tmp_path, serving_files, monkeypatch):
    """memory:// is fsspec's in-process file system: like object storage, it is reached only through the URI."""
    import fsspec

    from trainers.checkpoint import load_model

    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    root = f"memory://reg-{tmp_path.name}"
    reg = Registry(root)
    assert reg.current() is None and reg.versions() == [] and reg.history() == []
    v1 = reg.publish(_checkpoint(tmp_path / "a", 0), serving_files)
    # A version still being uploaded by someone else has no manifest.json: not listed, number not reused.
    memory.pipe(f"{root}/versions/v0002/model.safetensors", b"half")
    v3 = reg.publish(_checkpoint(tmp_path / "b", 1), serving_files)
    assert (v1, v3, reg.versions(), reg.current()) == ("v0001", "v0003", ["v0001", "v0003"], "v0003")
    with pytest.raises(RegistryError, match="no version"):
        reg.path("v0002")

    # Both versions share one copy of the features, inside the registry.
    assert reg.manifest(v1)["features"] == reg.manifest(v3)["features"]
    assert reg.manifest(v1)["features"].startswith(f"{root}/features/")
    local = reg.features_path(v3)
    assert local.is_relative_to(tmp_path / "cache")
    copied = {p.name: p.read_bytes() for p in local.iterdir()}
    assert copied == {p.name: p.read_bytes() for p in serving_files.iterdir()}

    # Readers get local folders that load; the two versions are different models.
    kind, m1 = load_model(reg.path(v1))
    _, m3 = load_model(reg.path(v3))
    assert kind == "sr" and reg.path(v1).is_relative_to(tmp_path / "cache")
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))

    assert reg.rollback() == "v0001" and reg.current() == "v0001"
    assert [h["action"] for h in reg.history()] == ["publish", "publish", "rollback"]
    # A second reader (another replica) sees the same state.
    assert Registry(root + "/").current() == "v0001"


def test_object_storage_registry_refuses_incomplete_features(tmp_path, features, monkeypatch):
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    reg = Registry(f"memory://reg-{tmp_path.name}")
    with pytest.raises(RegistryError, match="lacks"):
        reg.publish(_checkpoint(tmp_path / "a"), features)
    assert reg.versions() == []


def test_file_uri_is_the_local_registry(tmp_path, features):
    reg = Registry(f"file://{tmp_path}/reg")
    v1 = reg.publish(_checkpoint(tmp_path / "a"), features)
    assert Registry(tmp_path / "reg").current() == v1
    assert reg.path(v1) == tmp_path / "reg" / "versions" / v1
    assert reg.features_path(v1) == features.resolve()
