import numpy as np

from serving.histories import history_from_store, latest_hot_comments

VIDEOS = {"va": 0, "vb": 1, "vc": 2}
COMMENTS = {"c1": 0, "c2": 1, "c3": 2, "c4": 3, "c5": 4}


def _rows(videos=(), comments=()):
    return {
        "video_ids": [v for v, _ in videos], "video_ts": [t for _, t in videos],
        "comment_ids": [c for c, _, _ in comments], "comment_video_ids": [v for _, v, _ in comments],
        "comment_ts": [t for _, _, t in comments],
    }


def test_store_rows_become_history_columns():
    rows = _rows(
        videos=[("va", 10), ("unknown", 11), ("vb", 12), ("va", 13)],
        comments=[("c1", "va", 20), ("c2", "vb", 21), ("c3", "va", 22), ("c1", "va", 23), ("c4", "va", 24),
                  ("c5", "va", 25), ("c9", "va", 26)],
    )
    hot = np.array([4, -1, 2])
    got = history_from_store(rows, VIDEOS, COMMENTS, hot, max_history=50)
    # "unknown" video and comment "c9" are skipped; va's record keeps its 3 newest distinct comments
    # (c1 moved to the newest place at ts 23, then c4 and c5 push c3 out) and is newer than vb's.
    assert got == {
        "hist_video": [[0, 1, 0]],
        "hist_video_hot": [[4, -1, 4]],
        "hist_video_ts": [[10, 12, 13]],
        "hist_cmt_video": [[1, 0]],
        "hist_cmt_comments": [[1, -1, -1, 0, 3, 4]],
        "hist_cmt_ts": [[21, 25]],
    }


def test_history_is_capped_and_empty_store_gives_none():
    rows = _rows(videos=[("va", 1), ("vb", 2), ("vc", 3)])
    got = history_from_store(rows, VIDEOS, COMMENTS, np.full(3, -1), max_history=2)
    assert got["hist_video"] == [[1, 2]] and got["hist_video_ts"] == [[2, 3]]
    assert history_from_store(_rows(), VIDEOS, COMMENTS, np.full(3, -1), max_history=2) is None
    assert history_from_store(_rows(videos=[("nope", 1)]), VIDEOS, COMMENTS, np.full(3, -1), 2) is None


def test_latest_hot_comment_is_the_newest_observation():
    hot = latest_hot_comments([[0, 1], [0]], [[5, 7], [6]], [[10, 11], [12]], num_videos=3)
    assert hot.tolist() == [6, 7, -1]


def test_fresh_history_gives_the_gaps_the_model_measures():
    # Serving collates a store history like an example: element times travel with the elements, and the
    # gap buckets at request time are the same function of (request - element time) as in training.
    import torch

    from trainers.data import collate_histories
    from trainers.models.layers import time_buckets

    rows = _rows(videos=[("va", 1_000), ("vb", 61_000)], comments=[("c1", "va", 2_000)])
    hist = collate_histories(history_from_store(rows, VIDEOS, COMMENTS, np.full(3, -1), max_history=4), 4)
    assert hist["hist_video_ts"].tolist() == [[1_000, 61_000]] and hist["hist_cmt_ts"].tolist() == [[2_000]]
    # At request time 181_000: gaps of 3 min (bucket 1 + floor(2 log2 3) = 4) and 2 min (bucket 3).
    assert time_buckets(181_000 - hist["hist_video_ts"], 48).tolist() == [[4, 3]]
    assert time_buckets(torch.tensor([181_000 - 2_000]), 48).tolist() == [4]  # 2.98 min: 2 log2 = 3.15
