"""The user-independent freshness score (trainers/models/item_time.py), in SR and SASRec."""

import math

import pytest
import torch

from trainers.losses import candidate_logits, comment_loss, video_loss
from trainers.models import ModelSize, SASRec, SASRecConfig, SRConfig, SRModel
from trainers.models.item_time import LOG_SCALE, list_features, video_pool_features

MINUTE, DAY = 60_000, 86_400_000
V, C, D, H = 10, 30, 8, 16
VIDEO_DAYS = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # video 1 is the newer twin of video 0
SIZE = ModelSize(hidden=H, num_heads=2, inner=32, max_history=4)


def log_minutes(minutes: float) -> float:
    return math.log1p(minutes) / LOG_SCALE


def test_video_pool_features_by_hand():
    pub_sorted = torch.tensor([0, 10, 20, 30]) * MINUTE
    # At minute 25 the pool is videos 0, 10 and 20 (30 is not out yet); the newest is minute 20.
    got = video_pool_features(pub_sorted, torch.tensor([10 * MINUTE, 20 * MINUTE, 0]), torch.tensor(25 * MINUTE))
    expect = torch.tensor([[log_minutes(15), log_minutes(10), math.log1p(1) / LOG_SCALE, 1 / 2, 1 / (1 + 10 / 60)],
                           [log_minutes(5), log_minutes(0), 0.0, 1.0, 1.0],
                           [log_minutes(25), log_minutes(20), math.log1p(2) / LOG_SCALE, 1 / 3, 1 / (1 + 20 / 60)]])
    assert torch.allclose(got, expect, atol=1e-6)
    # Per row request times: the same video at minute 35 has three newer videos, the newest at minute 30.
    got = video_pool_features(pub_sorted, torch.tensor([[0], [0]]), torch.tensor([[25 * MINUTE], [35 * MINUTE]]))
    assert got[:, 0, 2].tolist() == pytest.approx([math.log1p(2) / LOG_SCALE, math.log1p(3) / LOG_SCALE])
    assert got[1, 0, 1].item() == pytest.approx(log_minutes(30))


def test_list_features_treat_each_list_as_its_pool():
    pub = torch.tensor([[5, 1, 3, 0], [2, 2, 9, 9]]) * MINUTE
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    got = list_features(pub, valid, torch.tensor([10 * MINUTE, 4 * MINUTE]))
    # Row 0: newest is minute 5; newer counts 0, 2, 1. Row 1: two comments at minute 2 (padding ignored).
    assert got[0, :3, 2].tolist() == pytest.approx([0.0, math.log1p(2) / LOG_SCALE, math.log1p(1) / LOG_SCALE])
    assert got[0, :3, 1].tolist() == pytest.approx([log_minutes(0), log_minutes(4), log_minutes(2)])
    assert got[0, :3, 0].tolist() == pytest.approx([log_minutes(5), log_minutes(9), log_minutes(7)])
    assert got[1, :2, 2].tolist() == [0.0, 0.0] and got[1, :2, 1].tolist() == [0.0, 0.0]
    assert got[0, :3, 3].tolist() == pytest.approx([1.0, 1 / 3, 1 / 2]) and got[1, :2, 3].tolist() == [1.0, 1.0]


def sr_model(freshness: bool = True) -> SRModel:
    torch.manual_seed(0)
    model = SRModel(SRConfig(num_videos=V, num_comments=C, text_dim=D, size=SIZE, time_features=True,
                             freshness=freshness))
    text = torch.randn(V, D)
    text[1] = text[0]  # videos 0 and 1 have the same text; 1 is newer
    model.set_text_tables(text, torch.randn(C, D))
    model.set_item_times(VIDEO_DAYS * DAY, torch.arange(C) * MINUTE)
    model.set_seen(torch.zeros(V, dtype=torch.bool), torch.zeros(C, dtype=torch.bool))  # no ID signal
    return model.eval()


def prefer_newer(model) -> None:
    """Freshness weights that say "the younger, the better": score = -3 tanh(log-age feature)."""
    with torch.no_grad():
        for head in (model.video_fresh, model.comment_fresh):
            head.hidden.weight.zero_()
            head.hidden.bias.zero_()
            head.hidden.weight[0, 0] = 1.0
            head.out.weight.zero_()
            head.out.weight[0, 0] = -3.0


def test_untrained_freshness_scores_nothing_and_trained_weights_rank_the_newer_twin_first(history_batch):
    model = sr_model()
    batch = {**history_batch(), "ts": torch.tensor([12 * DAY, 12 * DAY]),
             "hist_video_ts": torch.zeros(2, 4, dtype=torch.long), "hist_cmt_ts": torch.zeros(2, 2, dtype=torch.long)}
    user = model.user_video_vector(batch)
    twins = torch.tensor([[0, 1], [1, 0]])
    before = candidate_logits(model, "video", user, twins, batch["ts"])
    assert torch.equal(model.freshness_scores("video", twins, batch["ts"][:, None]), torch.zeros(2, 2))
    assert before[0, 0] == before[0, 1]  # same text, no ID part, zero age tables: a tie for any user
    prefer_newer(model)
    after = candidate_logits(model, "video", user, twins, batch["ts"])
    assert after[0, 1] > after[0, 0] and after[1, 0] > after[1, 1]  # video 1 (newer) first in both orders
    # Padding gets no freshness score.
    assert model.freshness_scores("video", torch.tensor([[0, -1]]), batch["ts"][:1, None])[0, 1] == 0
    # Comments: the newest of the list ranks first once the weights say so.
    comments = torch.tensor([[0, 5, 3], [2, 4, -1]])
    context = model.comment_context_vector(batch, torch.tensor([1, 2]))
    fresh = model.freshness_scores("comment", comments, batch["ts"])
    assert fresh[0].argmax().item() == 1 and fresh[1, :2].argmax().item() == 1 and fresh[1, 2] == 0
    assert candidate_logits(model, "comment", context, comments, batch["ts"]).shape == (2, 3)
    with pytest.raises(ValueError, match="candidate lists"):
        model.freshness_scores("comment", torch.tensor([1, 2]), batch["ts"])


def test_freshness_heads_train_and_are_off_without_the_flag(history_batch):
    model = sr_model().train()
    batch = {**history_batch(), "ts": torch.tensor([12 * DAY, 12 * DAY]),
             "hist_video_ts": torch.zeros(2, 4, dtype=torch.long), "hist_cmt_ts": torch.zeros(2, 2, dtype=torch.long),
             "target": torch.tensor([1, 2]), "negatives": torch.tensor([[0, 3], [4, -1]]),
             "query_video": torch.tensor([1, 2])}
    (video_loss(model, batch, train_negatives=2) + comment_loss(model, batch)).backward()
    for head in (model.video_fresh, model.comment_fresh):
        assert head.out.weight.grad.abs().sum() > 0
    plain = sr_model(freshness=False)
    assert not any("fresh" in k for k in plain.state_dict())
    assert torch.equal(plain.freshness_scores("video", torch.tensor([0, 1]), torch.tensor(12 * DAY)), torch.zeros(2))
    with pytest.raises(ValueError, match="freshness"):
        SRConfig(num_videos=V, num_comments=C, text_dim=D, freshness=True)


def test_in_batch_targets_from_the_future_are_no_candidates(history_batch):
    model = sr_model()
    # Row 0 happens at day 2.5: video 3 (row 1's target, published day 3) did not exist yet.
    batch = {**history_batch(), "ts": torch.tensor([DAY * 5 // 2, 12 * DAY]),
             "hist_video_ts": torch.zeros(2, 4, dtype=torch.long), "hist_cmt_ts": torch.zeros(2, 2, dtype=torch.long),
             "target": torch.tensor([1, 3])}
    with torch.no_grad():
        user = model.user_video_vector(batch)
        loss = video_loss(model, batch, train_negatives=0)
        both = candidate_logits(model, "video", user, torch.tensor([[1, 3], [3, 1]]), batch["ts"])
    # Row 0's softmax holds its target only (loss 0); row 1 ranks its target against video 1.
    expect = torch.nn.functional.cross_entropy(both[1:], torch.tensor([0]))
    assert loss.item() == pytest.approx(expect.item() / 2, abs=1e-5)


def test_sasrec_reads_time_too(history_batch):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_videos=V, num_comments=C, size=SIZE, time_features=True))
    model.set_item_times(VIDEO_DAYS * DAY, torch.arange(C) * MINUTE)
    batch = {**history_batch(), "ts": torch.tensor([12 * DAY, 12 * DAY]),
             "hist_video_ts": torch.zeros(2, 4, dtype=torch.long), "hist_cmt_ts": torch.zeros(2, 2, dtype=torch.long),
             "target": torch.tensor([1, 2]), "negatives": torch.tensor([[0, 3], [4, -1]]),
             "query_video": torch.tensor([1, 2])}
    model.train()
    (video_loss(model, batch, train_negatives=2) + comment_loss(model, batch)).backward()
    for name in ("video_gap", "comment_gap", "video_age", "comment_age"):
        assert getattr(model, name).weight.grad.abs().sum() > 0, name
    assert model.video_fresh.out.weight.grad.abs().sum() > 0
    # The request time moves the gaps, so the user vector.
    model.eval()
    later = {**batch, "ts": batch["ts"] + 300 * DAY}
    assert not torch.allclose(model.user_video_vector(later), model.user_video_vector(batch), atol=1e-4)
    with pytest.raises(ValueError, match="request time"):
        model.user_video_vector({k: v for k, v in batch.items() if k != "ts"})
