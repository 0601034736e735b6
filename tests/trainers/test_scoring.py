import time

import pyarrow.parquet as pq
import pytest
import torch

from features.folder import FeaturesFolder
from trainers.checkpoint import CheckpointError, save_checkpoint
from trainers.data import text_tensors
from trainers.losses import candidate_logits
from trainers.models import ModelSize, Recommender, SASRec, SASRecConfig, SRConfig, SRModel, TextRecommender
from trainers.scoring import Scorer

SIZE = ModelSize(hidden=16, inner=32, max_history=8)


@pytest.fixture(scope="module")
def sr_checkpoint(fake_features, tmp_path_factory):
    torch.manual_seed(0)
    model = SRModel(SRConfig(num_videos=48, num_comments=192, text_dim=32, size=SIZE))
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
    model = SRModel(SRConfig(num_videos=48, num_comments=192, text_dim=16, size=ModelSize(hidden=16, inner=32)))
    save_checkpoint(tmp_path, "sr", model.config, model.state_dict())
    with pytest.raises(CheckpointError, match="does not fit the features"):
        Scorer(tmp_path, fake_features)


@pytest.fixture(scope="module")
def timed_checkpoint(fake_features, tmp_path_factory):
    torch.manual_seed(0)
    model = SRModel(SRConfig(num_videos=48, num_comments=192, text_dim=32, size=SIZE, time_features=True,
                             freshness=True))
    with torch.no_grad():  # untrained age tables and freshness outputs are zero: give them values so they matter
        model.video_age.weight.normal_()
        model.comment_age.weight.normal_()
        for head in (model.video_fresh, model.comment_fresh):
            head.out.weight.normal_()
    path = tmp_path_factory.mktemp("timed")
    save_checkpoint(path, "sr", model.config, model.state_dict())
    return path


def test_time_features_score_alike_in_every_path(fake_features, timed_checkpoint):
    scorer = Scorer(timed_checkpoint, fake_features)
    users = pq.read_table(fake_features / "users.parquet").slice(0, 3).to_pydict()
    # Serving: rows without ts are scored at the request time (here fixed; the clock by default).
    hist = scorer.histories(users, now_ms=1_000_000 + 40 * 60_000)
    assert hist["ts"].tolist() == [1_000_000 + 40 * 60_000] * 3
    assert abs(int(scorer.histories(users)["ts"][0]) - time.time() * 1000) < 60_000
    model = scorer.model
    # Item i is published at ts i (conftest), so at the request every video is 40 min + 1e6 - i ms old:
    # 1e6 ms = 16.7 min, 56.7 min -> 2 log2(56.7) = 11.6 -> bucket 12 for all 48 videos.
    assert (model.age_buckets("video", torch.arange(48), hist["ts"][0]) == 12).all()
    scores = scorer.video_scores(hist)  # [3, 48]: precomputed matrix + per-request age and freshness terms
    with torch.no_grad():
        direct = model.user_video_vector(hist) @ model.video_item_vectors(torch.arange(48), hist["ts"][0]).T / 0.07
        fresh = model.freshness_scores("video", torch.arange(48), hist["ts"][0])
    assert fresh.abs().min() > 0 and fresh.std() > 0  # the freshness term is there and differs by video
    assert torch.allclose(scores, direct + fresh, atol=1e-5)
    cands = torch.tensor([[3, 7, -1]] * 3)
    picked = scorer.video_candidate_scores(hist, cands)
    assert torch.allclose(picked[:, :2], scores[:, [3, 7]], atol=1e-5) and (picked[:, 2] == float("-inf")).all()
    # A later request ages every item: the scores move.
    later = scorer.video_scores(scorer.histories(users, now_ms=10**12))
    assert not torch.allclose(later, scores, atol=1e-3)
    # Rows of one batch at different request times are each scored at their own time.
    mixed = dict(hist, ts=torch.tensor([hist["ts"][0], 10**12, hist["ts"][0]]))
    assert torch.allclose(scorer.video_scores(mixed), torch.stack([scores[0], later[1], scores[2]]), atol=1e-5)
    # Comments, against the model's own vectors at the same request time.
    query, cands = torch.tensor([4, 5, 6]), torch.tensor([[16, 17, 18], [20, 21, -1], [24, 25, 26]])
    got = scorer.comment_scores(hist, query, cands)
    with torch.no_grad():
        context = model.comment_context_vector(hist, query)
        items = model.comment_item_vectors(cands, hist["ts"][:, None])
        expect = torch.einsum("bh,bkh->bk", context, items) / 0.07 + model.freshness_scores("comment", cands, hist["ts"])
        # The training losses' scores (trainers/losses.py) are the serving scores.
        trained = candidate_logits(model, "comment", context, cands, hist["ts"])
        trained_videos = candidate_logits(model, "video", model.user_video_vector(hist), torch.tensor([[3, 7]] * 3),
                                          hist["ts"])
    assert torch.allclose(got[:, :2], expect[:, :2], atol=1e-5) and got[1, 2] == float("-inf")
    assert torch.allclose(got[:, :2], trained[:, :2], atol=1e-5)
    assert torch.allclose(trained_videos, scores[:, [3, 7]], atol=1e-5)


def test_scores_without_the_age_terms(fake_features, timed_checkpoint):
    scorer = Scorer(timed_checkpoint, fake_features, age_terms=False)
    hist = scorer.histories(pq.read_table(fake_features / "users.parquet").slice(0, 3).to_pydict(), now_ms=10**9)
    model = scorer.model
    with torch.no_grad():
        direct = model.user_video_vector(hist) @ model.timeless_item_vectors("video", torch.arange(48)).T / 0.07
    assert torch.allclose(scorer.video_scores(hist), direct, atol=1e-5)
    assert not torch.allclose(Scorer(timed_checkpoint, fake_features).video_scores(hist), direct, atol=1e-3)
    picked = scorer.video_candidate_scores(hist, torch.tensor([[3, 7]] * 3))
    assert torch.allclose(picked, direct[:, [3, 7]], atol=1e-5)


def test_grown_tables_take_new_items_as_published_now(fake_features, timed_checkpoint):
    scorer = Scorer(timed_checkpoint, fake_features)
    video, comment = scorer.model.video_text, scorer.model.comment_text
    before = time.time() * 1000
    scorer.set_text_tables(torch.cat([video, video[:2]]), comment)  # two videos arrived (serving/catalog.py)
    assert scorer.video_pub_ts[:48].tolist() == list(range(48))
    assert (scorer.video_pub_ts[48:] >= before).all() and scorer.video_matrix.shape[0] == 50
    hist = scorer.histories(pq.read_table(fake_features / "users.parquet").slice(0, 1).to_pydict())
    assert scorer.model.age_buckets("video", torch.tensor([49]), hist["ts"][0]).item() == 0  # under a minute
    assert scorer.video_scores(hist).shape == (1, 50)


def test_full_corpus_scores_follow_bucket_changes_through_the_cache(fake_features, timed_checkpoint):
    scorer = Scorer(timed_checkpoint, fake_features)
    model = scorer.model
    users = pq.read_table(fake_features / "users.parquet").slice(0, 2).to_pydict()
    now = 1_000_000 + 40 * 60_000  # every video in bucket 12 (see above), which ends at ceil(60000 * 2^6) ms
    # Video 0 (published at 0) is the oldest: it reaches 3,840,000 ms of age first, 440,000 ms from now.
    crossing = 3_840_000 - now

    def direct(t):
        hist = scorer.histories(users, now_ms=t)
        with torch.no_grad():
            return (model.user_video_vector(hist) @ model.video_item_vectors(torch.arange(48), t).T / 0.07
                    + model.freshness_scores("video", torch.arange(48), t))

    for t in (now, now + crossing - 1, now + crossing, now + 10**9):
        assert torch.allclose(scorer.video_scores(scorer.histories(users, now_ms=t)), direct(t), atol=1e-5), t
    assert model.age_buckets("video", torch.tensor([0, 1]), now + crossing).tolist() == [13, 12]
    scorer.video_scores(scorer.histories(users, now_ms=now))
    assert scorer._aged[:2] == (now, now + crossing)


def test_an_id_only_model_takes_grown_tables_as_new_item_counts(fake_features, tmp_path):
    """SASRec reads no text (it is not a TextRecommender): grown tables only add items, which score as zero
    vectors, as items beyond its ID table do."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_videos=48, num_comments=192, size=SIZE))
    assert isinstance(model, Recommender) and not isinstance(model, TextRecommender)
    save_checkpoint(tmp_path, "sasrec", model.config, model.state_dict())
    scorer = Scorer(tmp_path, fake_features)
    video, comment = text_tensors(FeaturesFolder(fake_features))
    scorer.set_text_tables(torch.cat([video, video[:2]]), comment)
    hist = scorer.histories(pq.read_table(fake_features / "users.parquet").slice(0, 2).to_pydict())
    scores = scorer.video_scores(hist)
    assert scores.shape == (2, 50) and (scores[:, 48:] == 0).all() and scores[:, :48].abs().sum() > 0
