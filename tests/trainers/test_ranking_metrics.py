import math

import numpy as np
import pytest

from trainers.metrics import (
    METRIC_NAMES,
    metric_values,
    nonfinite_examples,
    paired_bootstrap,
    ranking_metrics,
    ranks_from_scores,
)


def test_rank_counts_candidates_scoring_at_least_the_target():
    # target 0.5; 0.9 is ahead and the tie 0.5 counts as ahead (pessimistic); 0.1 is behind.
    assert ranks_from_scores([0.5], [[0.9, 0.5, 0.1]]).tolist() == [2]


def test_rank_ignores_invalid_candidates():
    ranks = ranks_from_scores([0.5, 0.2], [[0.9, 0.1, 0.7], [0.1, 0.3, 0.4]],
                              valid=[[True, True, False], [False, False, False]])
    assert ranks.tolist() == [1, 0]


def test_rank_shape_errors():
    with pytest.raises(ValueError):
        ranks_from_scores([0.5, 0.1], [[0.9, 0.5]])
    with pytest.raises(ValueError):
        ranks_from_scores([0.5], [[0.9, 0.5]], valid=[[True]])


def test_metrics_by_hand():
    m = ranking_metrics(np.array([0, 2, 7, 12]))
    assert m["count"] == 4
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == pytest.approx(3 / 4)
    # NDCG: rank 0 -> 1/log2(2) = 1, rank 2 -> 1/log2(4) = 0.5, rank 7 -> 1/log2(9) (only within 10).
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(9)) / 4)
    assert m["ndcg@10"] == pytest.approx(0.4538662, abs=1e-6)
    # MRR: 1/1, 1/3, and 1/8 within 10.
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 8) / 4)


def test_metrics_of_nothing_are_none():
    m = ranking_metrics(np.zeros(0, dtype=np.int64))
    assert m["count"] == 0
    assert all(m[name] is None for name in METRIC_NAMES)


def test_nonfinite_scores_rank_last_and_are_counted():
    nan, inf = float("nan"), float("inf")
    target = [nan, 0.5, inf, 0.5]
    cands = [[0.1, -5.0], [nan, 0.2], [0.1, 0.2], [inf, -inf]]
    valid = [[True, True], [True, True], [True, False], [True, True]]
    # A non-finite target is behind every valid candidate; a non-finite candidate is behind a finite target.
    assert ranks_from_scores(target, cands, valid).tolist() == [2, 0, 1, 0]
    assert nonfinite_examples(target, cands, valid) == 4
    assert nonfinite_examples([0.5], [[0.1, -inf]], [[True, False]]) == 0  # padding is not counted


def test_metric_values_average_to_the_metric():
    ranks = np.array([0, 2, 7, 12])
    for name in METRIC_NAMES:
        assert metric_values(ranks, name).mean() == pytest.approx(ranking_metrics(ranks)[name])
    assert metric_values(ranks, "ndcg@10").tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(9), 0.0])


def test_paired_bootstrap_by_hand():
    # Two users. u1: a - b = +1, +1; u2: a - b = 0. Mean over the 3 examples = 2/3.
    a, b, users = np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.0]), np.array(["u1", "u1", "u2"])
    out = paired_bootstrap(a, b, users, n_boot=2000, seed=1)
    assert out["diff"] == pytest.approx(2 / 3) and out["examples"] == 3 and out["groups"] == 2
    # Resampling users gives 1 (u1 twice), 0 (u2 twice) or 2/3 (one of each): the interval spans [0, 1].
    assert out["ci95"] == [0.0, 1.0] and not out["significant"]
    # Every user better by 0.1 (different noise levels): the interval excludes 0.
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 3)
    base = rng.random(600)
    out = paired_bootstrap(base + 0.1, base, users, seed=0)
    assert out["significant"] and out["ci95"][0] == pytest.approx(0.1) and out["ci95"][1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one value per example"):
        paired_bootstrap(a, b[:2], users[:3])
