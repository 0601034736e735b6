"""Time in the SR model (issue 8): log-time buckets, history-gap and item-age embeddings, the off switch."""

import pytest
import torch

from trainers.models import ModelSize, SRConfig, SRModel, build_model
from trainers.models.layers import time_bucket_edges, time_buckets

V, C, D, H = 10, 30, 8, 16
MINUTE, DAY = 60_000, 86_400_000


def make_model(time_features: bool, seed: int = 0) -> SRModel:
    torch.manual_seed(seed)
    model = SRModel(SRConfig(num_videos=V, num_comments=C, text_dim=D, time_features=time_features,
                             size=ModelSize(hidden=H, num_heads=2, inner=32, max_history=4)))
    torch.manual_seed(1)
    model.set_text_tables(torch.randn(V, D), torch.randn(C, D))
    # Video i published at day i, comment j at day j // 3 (with its video).
    model.set_item_times(torch.arange(V) * DAY, torch.arange(C) // 3 * DAY)
    model.set_seen(torch.ones(V, dtype=torch.bool), torch.ones(C, dtype=torch.bool))
    return model.eval()


def timed(batch: dict) -> dict:
    """The conftest history batch with element times and a request time at day 20."""
    return {**batch, "ts": torch.tensor([20 * DAY, 20 * DAY]),
            "hist_video_ts": torch.tensor([[DAY, 2 * DAY, 3 * DAY, 19 * DAY], [-1, -1, 5 * DAY, 6 * DAY]]),
            "hist_cmt_ts": torch.tensor([[4 * DAY, 18 * DAY], [-1, -1]])}


def test_time_buckets_by_hand():
    # Edges: 1 min, sqrt(2) min = 84852.8 ms rounded up, 2 min, ...
    assert time_bucket_edges(4).tolist() == [60_000, 84_853, 120_000]
    ages = torch.tensor([-5, 0, 59_999, 60_000, 84_852, 84_853, 119_999, 120_000])
    assert time_buckets(ages, 48).tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    # Bucket k starts at sqrt(2)^(k-1) min: 1024 min = sqrt(2)^20 starts bucket 21; one day (1440 min,
    # 2 log2(1440) = 20.98) is still in it, bucket 22 starts at 1448.2 min.
    assert time_buckets(torch.tensor([1024 * MINUTE - 1, 1024 * MINUTE, DAY]), 48).tolist() == [20, 21, 21]
    # Everything older than the last edge shares the last bucket; few buckets cap early.
    assert time_buckets(torch.tensor([10**15]), 48).tolist() == [47]
    assert time_buckets(torch.tensor([DAY]), 4).tolist() == [3]
    with pytest.raises(ValueError, match="num_buckets"):
        time_buckets(torch.tensor([1]), 1)


def test_age_buckets_of_items(history_batch):
    model = make_model(True)
    # Video 2 (day 2) seen at day 2 + 2 minutes: bucket 3; padding gets 0; comment 9 is under video 3.
    got = model.age_buckets("video", torch.tensor([[2, -1]]), torch.tensor([[2 * DAY + 2 * MINUTE]]))
    assert got.tolist() == [[3, 0]]
    assert model.age_buckets("comment", torch.tensor([9]), torch.tensor([3 * DAY + MINUTE])).tolist() == [1]
    with pytest.raises(ValueError, match="no publication time"):
        model.age_buckets("video", torch.tensor([V]), torch.tensor([0]))


def test_outputs_and_errors_without_times(history_batch):
    model = make_model(True)
    batch = timed(history_batch())
    assert model.user_video_vector(batch).shape == (2, H)
    assert model.comment_context_vector(batch, torch.tensor([1, 2])).shape == (2, H)
    assert model.video_item_vectors(torch.arange(5), batch["ts"][:1]).shape == (5, H)
    with pytest.raises(ValueError, match="request time"):
        model.user_video_vector(history_batch())
    with pytest.raises(ValueError, match="needs the request time ts"):
        model.video_item_vectors(torch.arange(5))


def test_age_term_is_added_after_normalisation(history_batch):
    model = make_model(True)
    with torch.no_grad():
        model.video_age.weight.copy_(torch.arange(48.0)[:, None].expand(48, H))
    idx = torch.tensor([[4, 9, -1]])
    got = model.video_item_vectors(idx, torch.tensor([[9 * DAY + 2 * MINUTE]]))  # [1, 3, H]
    unit = model.timeless_item_vectors("video", idx)
    # Video 9 is 2 minutes old (bucket 3); video 4 is 5 days = 7200 min old: 2 log2(7200) = 25.6 -> bucket 26.
    assert torch.allclose(got[0, 1] - unit[0, 1], torch.full((H,), 3.0))
    assert torch.allclose(got[0, 0] - unit[0, 0], torch.full((H,), 26.0))
    assert torch.equal(got[0, 2], torch.zeros(H))  # padding stays zero
    assert torch.allclose(unit[0, :2].norm(dim=-1), torch.ones(2), atol=1e-6)


def test_padding_and_the_future_do_not_leak(history_batch):
    model = make_model(True)
    batch = timed(history_batch())
    user = model.user_video_vector(batch)
    # Padding times and padding ids are invisible.
    changed = {**batch, "hist_video_ts": batch["hist_video_ts"].clone(), "hist_cmt_ts": batch["hist_cmt_ts"].clone()}
    changed["hist_video_ts"][1, :2] = 3 * DAY
    changed["hist_cmt_ts"][1] = 7 * DAY
    assert torch.allclose(model.user_video_vector(changed), user, atol=1e-6)
    # The causal encoders: a new time on the newest element does not change the states before it.
    before, _ = model.encode_histories(batch)
    later = {**batch, "hist_video_ts": batch["hist_video_ts"].clone()}
    later["hist_video_ts"][0, 3] = 10 * DAY
    after, _ = model.encode_histories(later)
    assert torch.allclose(after[0, :3], before[0, :3], atol=1e-6)
    assert not torch.allclose(after[0, 3], before[0, 3], atol=1e-4)
    # The request time moves every gap, so it changes the user vector.
    moved = {**batch, "ts": batch["ts"] + 300 * DAY}
    assert not torch.allclose(model.user_video_vector(moved), user, atol=1e-4)


def test_time_embeddings_get_gradients(history_batch):
    model = make_model(True).train()
    batch = timed(history_batch())
    user = model.user_video_vector(batch)  # [2, H]
    items = model.video_item_vectors(torch.tensor([[7, 8], [1, 2]]), batch["ts"][:, None])  # [2, 2, H]
    context = model.comment_context_vector(batch, torch.tensor([1, 2]))
    comments = model.comment_item_vectors(torch.tensor([[3, 4], [5, 6]]), batch["ts"][:, None])
    logits = torch.cat([torch.einsum("bh,bkh->bk", user, items), torch.einsum("bh,bkh->bk", context, comments)])
    torch.nn.functional.cross_entropy(logits / 0.07, torch.zeros(4, dtype=torch.long)).backward()
    for name in ("video_gap", "comment_gap", "video_age", "comment_age"):
        grad = getattr(model, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_switch_off_is_the_old_model(history_batch):
    old, new = make_model(False), make_model(True)
    assert not any("gap" in k or "age" in k for k in old.state_dict())
    # A saved config from before the field loads with time features off.
    assert build_model("sr", {"num_videos": V, "num_comments": C, "text_dim": D}).config.time_features is False
    # Same seed: every shared parameter is initialised alike (the time tables are created last).
    shared = old.state_dict()
    assert all(torch.equal(new.state_dict()[k], v) for k, v in shared.items())
    # With zero gap tables the time model computes the old model's outputs (the age tables start at zero).
    with torch.no_grad():
        new.video_gap.weight.zero_()
        new.comment_gap.weight.zero_()
    batch, query, idx = timed(history_batch()), torch.tensor([1, 2]), torch.arange(V)
    assert torch.allclose(new.user_video_vector(batch), old.user_video_vector(history_batch()), atol=1e-6)
    assert torch.allclose(new.comment_context_vector(batch, query), old.comment_context_vector(history_batch(), query),
                          atol=1e-6)
    assert torch.allclose(new.video_item_vectors(idx, batch["ts"][0]), old.video_item_vectors(idx), atol=1e-6)
    # The old model ignores time entirely.
    assert torch.equal(old.user_video_vector(batch), old.user_video_vector(history_batch()))
