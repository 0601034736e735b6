import pytest
import torch

from serving.state import load_state
from tests.serving.conftest import make_checkpoint
from trainers.registry import Registry

pytestmark = pytest.mark.integration  # the features fixture runs Ray


def test_a_version_from_an_object_storage_registry_serves_like_the_local_files(serving_features, tmp_path,
                                                                               monkeypatch):
    """What a replica on another node does: it has only the registry URI (memory:// here, fsspec's in-process
    file system) and loads the version and its features from local copies downloaded from it."""
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = make_checkpoint(serving_features, tmp_path / "ckpt", seed=5)
    registry = Registry(f"memory://registry-{tmp_path.name}")
    version = registry.publish(ckpt, serving_features)
    remote = load_state(version, registry.path(version), registry.features_path(version))
    local = load_state(version, ckpt, serving_features)

    assert remote.video_ids == local.video_ids and remote.comment_ids == local.comment_ids
    assert remote.users.keys() == local.users.keys()
    user = next(iter(local.users))
    hist = local.history(user)
    torch.testing.assert_close(remote.scorer.video_scores(remote.scorer.histories(hist)),
                               local.scorer.video_scores(local.scorer.histories(hist)), rtol=0, atol=0)
