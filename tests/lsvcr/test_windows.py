"""The continuous job's window steps (lsvcr/windows.py) on hand-made data."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.contract import TASKS
from lsvcr.windows import (
    align_due,
    cut_window,
    mean_score,
    publish_decision,
    remap_rows,
    should_train,
    split_of,
    window_bounds,
)


def test_should_train_on_count_or_timer():
    assert should_train(100, 0.0, every_examples=100, every_minutes=10) == "examples"
    assert should_train(99, 9.9, every_examples=100, every_minutes=10) is None
    assert should_train(1, 10.0, every_examples=100, every_minutes=10) == "timer"
    assert should_train(0, 60.0, every_examples=100, every_minutes=10) is None  # nothing new: no cycle
    assert should_train(5, 60.0, every_examples=100, every_minutes=0) is None  # timer off


def test_window_bounds_by_example_counts():
    ts = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    # newest 2 -> test (90, 100], 3 before -> valid (60, 90]... worked out: test_from = ts[10-2-1] = 80,
    # valid_from = ts[10-2-3-1] = 50, train (window 3): first = 10-2-3-3-1 = 1 -> train_from = 20.
    b = window_bounds(ts[::-1], window=3, valid=3, holdout=2, min_train=1)
    assert b == {"train_from": 20, "valid_from": 50, "test_from": 80, "cut": 100}
    assert list(split_of(ts, b)) == ["", "", "train", "train", "train", "valid", "valid", "valid", "test", "test"]
    # A window larger than the data starts before the first example.
    b = window_bounds(ts, window=100, valid=1, holdout=1, min_train=1)
    assert b["train_from"] == 9 and list(split_of(ts, b)).count("train") == 8
    assert window_bounds(ts, window=5, valid=4, holdout=4, min_train=3) is None  # 4 + 4 + 3 > 10


def test_publish_decision_margin_and_reasons():
    assert publish_decision(0.30, None, 0.01)[0] is True
    assert publish_decision(0.295, 0.30, 0.01)[0] is True  # worse, but within the margin
    ok, reason = publish_decision(0.28, 0.30, 0.01)
    assert not ok and "0.2800" in reason and "0.3000" in reason
    assert publish_decision(None, 0.30, 0.01) == (False, "no held-out example could be ranked")


def test_mean_score_over_tasks():
    results = {"video": {"candidate": {"ndcg@5": 0.2}, "serving": {"ndcg@5": 0.1}},
               "comment": {"candidate": {"ndcg@5": 0.4}, "serving": {"ndcg@5": None}}}
    assert mean_score(results, "candidate") == pytest.approx(0.3)
    assert mean_score(results, "serving") == pytest.approx(0.1)
    assert mean_score(results, "absent") is None


def test_align_every_third_cycle():
    assert [align_due(done, 3) for done in range(6)] == [False, False, True, False, False, True]
    assert not any(align_due(done, 0) for done in range(6))


def test_remap_rows_follows_ids():
    old = np.array([[1.0], [2.0], [3.0]])
    fresh = np.array([[-1.0], [-2.0], [-3.0], [-4.0]])
    # "b" moved to the front, "d" is new and keeps its fresh row, "c" was dropped.
    out = remap_rows(old, ["a", "b", "c"], fresh, ["b", "a", "d", "e"])
    assert out.tolist() == [[2.0], [1.0], [-3.0], [-4.0]]
    with pytest.raises(ValueError, match="3 rows for 2 ids"):
        remap_rows(old, ["a", "b"], fresh, ["a", "b", "c", "d"])


def test_cut_window_writes_splits_and_copies_item_tables(tmp_path):
    features = tmp_path / "features"
    for task in TASKS:
        folder = features / "examples" / task / "train"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"ts": pa.array([10, 20, 30, 40], pa.int64()), "target": [0, 1, 2, 3]}),
                       folder / "part-a.parquet")
    np.save(features / "video_emb.npy", np.zeros((4, 2), np.float32))
    (features / "manifest.json").write_text(json.dumps({"num_videos": 4}))
    (features / "_state").mkdir()
    bounds = {"train_from": 0, "valid_from": 20, "test_from": 30, "cut": 40}
    counts = cut_window(features, tmp_path / "w", bounds)
    assert counts == {t: {"train": 2, "valid": 1, "test": 1} for t in TASKS}
    test_rows = pq.read_table(tmp_path / "w" / "examples" / "video" / "test").column("target").to_pylist()
    assert test_rows == [3]
    assert (tmp_path / "w" / "video_emb.npy").exists() and not (tmp_path / "w" / "_state").exists()
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["window"]["cut"] == 40
