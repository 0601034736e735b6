import math

import numpy as np
import pytest

from trainers.evaluate import Ranking
from trainers.seeds import model_of, seed_name, seed_results


def ranking(ranks: dict[str, list[int]], users: list[str]) -> Ranking:
    n = len(users)
    cold = np.array([True] + [False] * (n - 1))
    return Ranking(task="video", user_id=np.array(users, dtype=object), candidates=np.full(n, 100),
                   slices={"cold_item": cold, "cold_user": np.zeros(n, bool), "rest": ~cold},
                   ranks={k: np.array(v) for k, v in ranks.items()}, nonfinite=dict.fromkeys(ranks, 0), skipped=0)


def test_seed_names():
    assert seed_name("sr_no_align", 2) == "sr_no_align@seed2"
    assert model_of("sr_no_align@seed2") == "sr_no_align" and model_of("popularity") == "popularity"


def test_means_stds_and_paired_difference_by_hand():
    users = ["u1", "u1", "u2", "u3"]
    r = ranking({seed_name("sr_no_align", 0): [0, 1, 5, 20], seed_name("sr_no_align", 1): [0, 3, 5, 20],
                 seed_name("lsvcr", 0): [0, 0, 0, 20], seed_name("lsvcr", 1): [0, 0, 0, 0],
                 "popularity": [20, 20, 20, 20]}, users)
    out = seed_results({"video": r}, reference="sr_no_align", n_boot=500)
    ndcg = lambda rank: 1 / math.log2(rank + 2) if rank < 10 else 0.0  # noqa: E731
    seed0 = np.mean([ndcg(0), ndcg(1), ndcg(5), 0.0])
    seed1 = np.mean([ndcg(0), ndcg(3), ndcg(5), 0.0])
    sr = out["video"]["sr_no_align"]
    assert sr["seeds"] == 2 and sr["count"] == 4
    assert sr["ndcg@10"] == pytest.approx((seed0 + seed1) / 2)
    assert sr["ndcg@10_std"] == pytest.approx(np.std([seed0, seed1], ddof=1))
    assert out["video"]["popularity"]["seeds"] == 1 and out["video"]["popularity"]["ndcg@10_std"] == 0.0
    # Paired on seed-averaged per-example NDCG@10: lsvcr [1, 1, 1, 0.5], sr [1, (ndcg(1)+ndcg(3))/2, ndcg(5), 0].
    diff = np.mean([0.0, 1 - (ndcg(1) + ndcg(3)) / 2, 1 - ndcg(5), 0.5])
    lsvcr = out["paired"]["video"]["lsvcr"]["sr_no_align"]
    assert lsvcr["diff"] == pytest.approx(diff) and lsvcr["groups"] == 3
    assert lsvcr["ci95"][0] <= diff <= lsvcr["ci95"][1]
    assert "sr_no_align" not in out["paired"]["video"]
    # Slices: the first example is the cold item.
    assert out["slices"]["video"]["cold_item"]["lsvcr"]["ndcg@10"] == pytest.approx(1.0)
    assert out["slices"]["video"]["cold_item"]["lsvcr"]["count"] == 1
    assert out["candidates"]["video"] == {"min": 100, "median": 100.0, "max": 100}
