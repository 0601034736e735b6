"""serving.app.top_videos: one top-k over a batch of score rows, each leaving out its own history."""

from types import SimpleNamespace

import pytest
import torch

from serving.app import top_videos

STATE = SimpleNamespace(video_ids=["a", "b", "c", "d"], video_titles=["A", "B", "C", "D"])


def _ids(items):
    return [(item.id, item.text, item.score) for item in items]


def test_each_row_gets_its_own_k_and_leaves_out_its_own_history():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3],
                           [0.8, 0.2, 0.4, 0.6]])
    histories = [{"hist_video": [[1]]}, {"hist_video": [[0, 3]]}]
    first, second = top_videos(STATE, scores, histories, ks=[2, 1], exclude_seen=[True, False])
    assert _ids(first) == [("c", "C", pytest.approx(0.5)), ("d", "D", pytest.approx(0.3))]  # b seen
    assert _ids(second) == [("a", "A", pytest.approx(0.8))]  # not excluded: its seen a still counts


def test_k_beyond_the_unseen_videos_returns_only_the_unseen_ones():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    (items,) = top_videos(STATE, scores, [{"hist_video": [[1, 2]]}], ks=[10], exclude_seen=[True])
    assert [item.id for item in items] == ["d", "a"]


def test_a_user_without_history_excludes_nothing():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    (items,) = top_videos(STATE, scores, [None], ks=[3], exclude_seen=[True])
    assert [item.id for item in items] == ["b", "c", "d"]
