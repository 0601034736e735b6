import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from features.folder import FeaturesFolder
from features.negatives import alive_bounds
from trainers.data import (
    collate,
    collate_histories,
    fresh_video_negatives,
    item_time_tensors,
    text_tensors,
    user_video_positives,
    without_later_positives,
)


def rows():
    # Row 0: three videos (the first without a hot comment), one comment record with two comments.
    # Row 1: a user with empty histories.
    return {
        "hist_video": [[5, 6, 7], []],
        "hist_video_hot": [[-1, 50, 51], []],
        "hist_video_ts": [[1, 2, 3], []],
        "hist_cmt_video": [[2], []],
        "hist_cmt_comments": [[10, 11, -1], []],
        "hist_cmt_ts": [[4], []],
    }


def test_histories_keep_newest_and_are_right_aligned():
    out = collate_histories(rows(), max_history=2)
    assert out["hist_video"].tolist() == [[6, 7], [-1, -1]]
    assert out["hist_video_hot"].tolist() == [[50, 51], [-1, -1]]
    assert out["hist_video_mask"].tolist() == [[True, True], [False, False]]
    assert out["hist_cmt_video"].tolist() == [[2], [-1]]
    assert out["hist_cmt_comments"].tolist() == [[[10, 11, -1]], [[-1, -1, -1]]]
    assert out["hist_cmt_mask"].tolist() == [[True], [False]]
    assert out["hist_video"].dtype == torch.long and out["hist_video_mask"].dtype == torch.bool
    # The element times travel with their elements, for the time features.
    assert out["hist_video_ts"].tolist() == [[2, 3], [-1, -1]]
    assert out["hist_cmt_ts"].tolist() == [[4], [-1]]
    assert "ts" not in out  # users.parquet rows have no request time


def test_examples_carry_their_request_time():
    out = collate({**rows(), "ts": [100, 200], "target": [3, 4], "negatives": [[1], [2]]}, 3)
    assert out["ts"].tolist() == [100, 200] and out["ts"].dtype == torch.long
    with pytest.raises(ValueError, match="ts has 1 values for 2 rows"):
        collate_histories({**rows(), "ts": [100]}, 3)


def test_histories_pad_to_the_longest_row():
    out = collate_histories(rows(), max_history=5)
    assert out["hist_video"].tolist() == [[5, 6, 7], [-1, -1, -1]]
    assert out["hist_video_mask"].tolist() == [[True, True, True], [False, False, False]]


def test_all_empty_histories_get_one_padding_slot():
    empty = {k: [[]] for k in rows()}
    out = collate_histories(empty, max_history=4)
    assert out["hist_video"].tolist() == [[-1]]
    assert out["hist_cmt_comments"].tolist() == [[[-1, -1, -1]]]
    assert out["hist_cmt_mask"].tolist() == [[False]]


def test_comment_records_are_truncated_as_whole_records():
    batch = {**{k: [[]] for k in rows()}, "hist_cmt_video": [[1, 2, 3]],
             "hist_cmt_comments": [[10, -1, -1, 20, 21, -1, 30, 31, 32]], "hist_cmt_ts": [[7, 8, 9]]}
    out = collate_histories(batch, max_history=2)
    assert out["hist_cmt_video"].tolist() == [[2, 3]]
    assert out["hist_cmt_comments"].tolist() == [[[20, 21, -1], [30, 31, 32]]]
    assert out["hist_cmt_ts"].tolist() == [[8, 9]]


def test_numpy_object_columns_give_the_same_tensors():
    as_lists = collate_histories(rows(), 3)
    as_numpy = {k: np.array([np.array(v, dtype=np.int32) for v in col] + [None], dtype=object)[:-1]
                for k, col in rows().items()}
    for key, value in collate_histories(as_numpy, 3).items():
        assert torch.equal(value, as_lists[key]), key


def test_bad_histories_are_rejected():
    with pytest.raises(ValueError, match="hist_video_hot"):
        collate_histories({**rows(), "hist_video_hot": [[1], []]}, 3)
    with pytest.raises(ValueError, match="3 x 1 records"):
        collate_histories({**rows(), "hist_cmt_comments": [[10, 11], []]}, 3)
    with pytest.raises(ValueError, match="hist_video_ts 2"):
        collate_histories({**rows(), "hist_video_ts": [[1, 2], []]}, 3)
    with pytest.raises(ValueError, match="hist_cmt_ts has 0"):
        collate_histories({**rows(), "hist_cmt_ts": [[], []]}, 3)
    with pytest.raises(ValueError, match="no column"):
        collate_histories({"hist_video": [[1]]}, 3)


def test_collate_candidates_and_likes():
    batch = {**rows(), "target": [3, 4], "query_video": [9, 8], "negatives": [[1, 2, 3], [4]],
             "target_likes": [5, 0], "negative_likes": [[1, 2, 3], [7]]}
    out = collate(batch, 3)
    assert out["target"].tolist() == [3, 4]
    assert out["query_video"].tolist() == [9, 8]
    assert out["negatives"].tolist() == [[1, 2, 3], [4, -1, -1]]
    assert out["target_likes"].tolist() == [5, 0]
    assert out["negative_likes"].tolist() == [[1, 2, 3], [7, 0, 0]]
    none = collate({**rows(), "target": [3, 4], "negatives": [[], []]}, 3)
    assert none["negatives"].tolist() == [[-1], [-1]]


def test_reading_the_features_folder(fake_features):
    folder = FeaturesFolder(fake_features)
    total = folder.count_examples("comment", "valid")
    assert total == 40
    batches = list(folder.iter_examples("comment", "valid", batch_size=16, max_examples=35))
    assert [len(b["target"]) for b in batches] == [16, 16, 3]
    assert batches[0]["negatives"].dtype == object
    video, comment = text_tensors(folder)
    assert video.shape == (48, 32) and comment.shape == (192, 32)
    assert text_tensors(FeaturesFolder(fake_features))[0] is video  # made once per process
    # Publication times: the features conftest publishes item i at ts i.
    video_ts, comment_ts = item_time_tensors(folder)
    assert video_ts.tolist() == list(range(48)) and comment_ts.shape == (192,) and int(comment_ts[17]) == 17
    users = pq.read_table(fake_features / "users.parquet").to_pydict()
    out = collate_histories(users, 8)
    assert out["hist_video"].shape[0] == 40
    assert out["hist_video_mask"].sum(1).tolist() == [min(8, len(v)) for v in users["hist_video"]]


def test_fresh_video_negatives_come_from_the_alive_pool_and_follow_its_ages():
    video_ts = np.arange(0, 1000, 10)  # video i published at 10 i
    ts, target = np.array([505, 505, 15, 1]), np.array([40, 3, 1, 0])
    rng = np.random.default_rng(0)
    # ts 505, W 100: published in [405, 505) -> videos 41..50 (10 of them); target 40 is outside anyway.
    out = fresh_video_negatives(*alive_bounds(video_ts, ts, 99, window_ms=100), target, k=8, rng=rng).numpy()
    assert all(41 <= v <= 50 for v in out[0]) and len(set(out[0])) == 8
    assert all(41 <= v <= 50 for v in out[1])
    assert sorted(out[2][out[2] >= 0].tolist()) == [0] and (out[2] == -1).sum() == 7  # pool {0, 1} minus target 1
    assert (out[3] == -1).all()  # nothing published before 1 but the target itself
    # Each event's own window for 99 negatives: the 100 newest before 505 are all 51 videos; each call draws anew.
    again = fresh_video_negatives(*alive_bounds(video_ts, ts, 99), target, k=8, rng=rng).numpy()
    assert all(0 <= v <= 50 and v != 40 for v in again[0])
    # Over many draws the negatives' ages match the pool's: the pool [0, 500) for ts 505 has mean age 255.
    lo, hi = alive_bounds(video_ts, np.full(4000, 505), 99)
    many = fresh_video_negatives(lo, hi, np.full(4000, 999), k=5, rng=np.random.default_rng(1)).numpy()
    ages = 505 - video_ts[many.ravel()]
    pool_ages = 505 - video_ts[:51]
    assert abs(ages.mean() - pool_ages.mean()) < 3  # 20k draws: standard error ~1
    assert np.allclose(np.percentile(ages, [10, 50, 90]), np.percentile(pool_ages, [10, 50, 90]), atol=15)


def test_later_positives_leave_the_comment_candidates(tmp_path, features_writer):
    write_examples, write_embeddings = features_writer
    write_embeddings(tmp_path, np.zeros((3, 2)), np.zeros((9, 2)))
    empty = {"hist_video": [], "hist_video_hot": [], "hist_video_ts": [], "hist_cmt_video": [],
             "hist_cmt_comments": [], "hist_cmt_ts": []}

    def row(event, user, video, target, ts, negatives):
        return {"user_id": user, "event_id": event, "ts": ts, "query_video": video, "target": target,
                "negatives": negatives, "target_likes": 0, "negative_likes": [10 + n for n in negatives], **empty}

    # u likes 1 @10 and 2 @20 under video 0, 5 @30 under video 1; w likes 2 under video 0.
    write_examples(tmp_path, "comment", "train", [row("a", "u", 0, 1, 10, [2, 3, 4]), row("b", "w", 0, 2, 11, [1, 3])])
    write_examples(tmp_path, "comment", "test", [row("c", "u", 0, 2, 20, [3]), row("d", "u", 1, 5, 30, [1, 2, 6])])
    folder = FeaturesFolder(tmp_path)
    assert user_video_positives(folder, ("train",)) == {("u", 0): {1}, ("w", 0): {2}}
    every = user_video_positives(folder, ("train", "test"))
    rows = next(folder.iter_examples("comment", "train", batch_size=8))
    out = without_later_positives(rows, every)
    # a: 2 is u's later positive under video 0 -> out (with its likes); b: w has no other positive.
    assert [list(n) for n in out["negatives"]] == [[3, 4], [1, 3]]
    assert [list(n) for n in out["negative_likes"]] == [[13, 14], [11, 13]]
    # Training reads its own split only: u's test positive 2 stays a negative there.
    assert [list(n) for n in without_later_positives(rows, user_video_positives(folder, ("train",)))["negatives"]] \
        == [[2, 3, 4], [1, 3]]
    d = without_later_positives(next(folder.iter_examples("comment", "test", batch_size=8)), every)
    assert list(d["negatives"][1]) == [1, 2, 6]  # positives under another video are fair negatives
