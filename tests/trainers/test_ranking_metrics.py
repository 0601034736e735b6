import math

import numpy as np
import pytest

from trainers.metrics import METRIC_NAMES, ranking_metrics, ranks_from_scores


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
