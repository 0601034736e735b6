import math

import numpy as np
import pytest

from trainers.evaluate import format_table
from trainers.ranking import Ranking, beats_every_baseline, model_of, results_of, seed_name


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
    out = results_of({"video": r}, reference="sr_no_align", n_boot=500)
    ndcg = lambda rank: 1 / math.log2(rank + 2) if rank < 10 else 0.0  # noqa: E731
    seed0 = np.mean([ndcg(0), ndcg(1), ndcg(5), 0.0])
    seed1 = np.mean([ndcg(0), ndcg(3), ndcg(5), 0.0])
    sr = out["video"]["sr_no_align"]
    assert sr["seeds"] == 2 and sr["count"] == 4
    assert sr["ndcg@10"] == pytest.approx((seed0 + seed1) / 2)
    assert sr["ndcg@10_std"] == pytest.approx(np.std([seed0, seed1], ddof=1))
    assert out["video"]["popularity"]["seeds"] == 1 and out["video"]["popularity"]["ndcg@10_std"] is None
    # Paired on seed-averaged per-example NDCG@10: lsvcr [1, 1, 1, 0.5], sr [1, (ndcg(1)+ndcg(3))/2, ndcg(5), 0].
    diff = np.mean([0.0, 1 - (ndcg(1) + ndcg(3)) / 2, 1 - ndcg(5), 0.5])
    lsvcr = out["paired"]["video"]["lsvcr"]["sr_no_align"]
    assert lsvcr["diff"] == pytest.approx(diff) and lsvcr["groups"] == 3
    assert lsvcr["ci95"][0] <= diff <= lsvcr["ci95"][1]
    # Every model is also paired with every baseline (here the only one, popularity); none with itself.
    assert set(out["paired"]["video"]["sr_no_align"]) == {"popularity"}
    assert set(out["paired"]["video"]["lsvcr"]) == {"sr_no_align", "popularity"}
    assert out["paired"]["video"]["lsvcr"]["popularity"]["diff"] == pytest.approx(np.mean([1.0, 1.0, 1.0, 0.5]))
    # Slices: the first example is the cold item.
    assert out["slices"]["video"]["cold_item"]["lsvcr"]["ndcg@10"] == pytest.approx(1.0)
    assert out["slices"]["video"]["cold_item"]["lsvcr"]["count"] == 1
    assert out["candidates"]["video"] == {"min": 100, "median": 100.0, "max": 100}


def test_every_model_is_also_paired_with_the_stage1_control():
    users = ["u1", "u2", "u3"]
    r = ranking({"sr_no_align": [20, 20, 20], "sr_rec_pretrain": [1, 20, 20], "lsvcr": [0, 0, 20],
                 "popularity": [20, 20, 20]}, users)
    paired = results_of({"video": r}, reference="sr_no_align", n_boot=200)["paired"]["video"]
    assert list(paired["lsvcr"]) == ["sr_no_align", "sr_rec_pretrain", "popularity"]
    # lsvcr's per-example NDCG@10 [1, 1, 0] minus the control's [1/log2(3), 0, 0]
    assert paired["lsvcr"]["sr_rec_pretrain"]["diff"] == pytest.approx((1 - 1 / math.log2(3) + 1) / 3)
    assert "sr_rec_pretrain" in paired["sr_no_align"] and "sr_no_align" in paired["sr_rec_pretrain"]


def test_the_table_marks_differences_whose_interval_contains_zero():
    users = ["u1", "u2", "u3", "u4"]
    r = ranking({"sr_no_align": [20, 20, 20, 20], "same": [20, 20, 20, 20], "better": [0, 0, 0, 0]}, users)
    out = results_of({"video": r}, reference="sr_no_align", n_boot=200)
    same, better = (out["paired"]["video"][m]["sr_no_align"] for m in ("same", "better"))
    assert (same["diff"], same["ci95"], same["significant"]) == (0.0, [0.0, 0.0], False)
    assert (better["diff"], better["ci95"], better["significant"]) == (1.0, [1.0, 1.0], True)
    table = format_table(out)
    lines = table[table.index("NDCG@10 minus sr_no_align's"):].splitlines()
    assert next(line for line in lines if line.startswith("same ")).endswith("not significant (interval contains 0)")
    assert next(line for line in lines if line.startswith("better ")).endswith(" significant")


def test_every_baseline_is_a_paired_reference_and_the_table_says_who_clears_them_all():
    users = ["u1", "u2", "u3", "u4"]
    r = ranking({"sr_no_align": [0, 0, 0, 0], "lsvcr": [0, 0, 0, 30], "recency": [5, 5, 5, 5],
                 "popularity": [30, 30, 30, 30], "recency_pop_blend": [0, 0, 0, 0]}, users)
    out = results_of({"video": r}, reference="sr_no_align", n_boot=200)
    # The reference first, then every baseline, strongest first.
    assert list(out["paired"]["video"]["lsvcr"]) == ["sr_no_align", "recency_pop_blend", "recency", "popularity"]
    assert beats_every_baseline(out["paired"]["video"], "sr_no_align") is False  # ties recency_pop_blend
    assert beats_every_baseline(out["paired"]["video"], "lsvcr") is False
    better = ranking({"sr_no_align": [0, 0, 0, 0], "recency": [5, 5, 5, 5], "popularity": [30, 30, 30, 30]}, users)
    paired = results_of({"video": better}, reference="sr_no_align", n_boot=200)["paired"]["video"]
    assert beats_every_baseline(paired, "sr_no_align") is True
    assert beats_every_baseline(paired, "missing") is None
    assert "above every baseline (each paired interval > 0): sr_no_align yes" in format_table(
        results_of({"video": better}, reference="sr_no_align", n_boot=200))
