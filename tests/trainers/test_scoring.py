import pyarrow.parquet as pq
import pytest
import torch

from trainers.checkpoint import CheckpointError, save_checkpoint
from trainers.models import SRConfig, SRModel
from trainers.scoring import Scorer


@pytest.fixture(scope="module")
def sr_checkpoint(fake_features, tmp_path_factory):
    torch.manual_seed(0)
    model = SRModel(SRConfig(num_videos=48, num_comments=192, text_dim=32, hidden=16, inner=32, max_history=8))
    model.set_seen(torch.ones(48, dtype=torch.bool), torch.ones(192, dtype=torch.bool))
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(path, "sr", model.config, model.state_dict())
    return path


def test_scores_match_the_model_methods(fake_features, sr_checkpoint):
    scorer = Scorer(sr_checkpoint, fake_features)
    users = pq.read_table(fake_features / "users.parquet").slice(0, 5).to_pydict()
    hist = scorer.histories(users)
    scores = scorer.video_scores(hist)
    assert scores.shape == (5, 48)
    model = scorer.model
    with torch.no_grad():
        direct = model.user_video_vector(hist) @ model.video_item_vectors(torch.arange(48)).T / 0.07
    assert torch.allclose(scores, direct, atol=1e-5)
    # A second load of the same checkpoint scores exactly alike.
    assert torch.equal(Scorer(sr_checkpoint, fake_features).video_scores(hist), scores)
    # Scoring chosen candidates is scoring the corpus and picking columns; -1 is padding.
    cands = torch.tensor([[3, 7, -1]] * 5)
    picked = scorer.video_candidate_scores(hist, cands)
    assert torch.allclose(picked[:, :2], scores[:, [3, 7]], atol=1e-5)
    assert (picked[:, 2] == float("-inf")).all()


def test_comment_scores(fake_features, sr_checkpoint):
    scorer = Scorer(sr_checkpoint, fake_features)
    hist = scorer.histories(pq.read_table(fake_features / "users.parquet").slice(0, 2).to_pydict())
    query = torch.tensor([4, 5])
    scores = scorer.comment_scores(hist, query, torch.tensor([[16, 17, 18], [20, -1, -1]]))
    assert scores.shape == (2, 3)
    assert torch.isfinite(scores[0]).all() and (scores[1, 1:] == float("-inf")).all()
    with torch.no_grad():
        context = scorer.model.comment_context_vector(hist, query)
        direct = (context[0] * scorer.model.comment_item_vectors(torch.tensor([17]))[0]).sum() / 0.07
    assert scores[0, 1].item() == pytest.approx(direct.item(), abs=1e-5)
    assert scores[torch.isfinite(scores)].abs().max() <= 1 / 0.07 + 1e-4
    with pytest.raises(ValueError, match="beyond"):
        scorer.comment_scores(hist, query, torch.tensor([[500], [1]]))


def test_corrupt_checkpoint_is_refused(fake_features, sr_checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((sr_checkpoint / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        Scorer(tmp_path, fake_features)


def test_checkpoint_for_other_features_is_refused(fake_features, tmp_path):
    model = SRModel(SRConfig(num_videos=48, num_comments=192, text_dim=16, hidden=16, inner=32))
    save_checkpoint(tmp_path, "sr", model.config, model.state_dict())
    with pytest.raises(CheckpointError, match="does not fit the features"):
        Scorer(tmp_path, fake_features)
