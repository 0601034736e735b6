import numpy as np
import pytest

from benchmarks.align_gpu import STAGE1, _options, joint_batches


def test_joint_batches_cover_every_row_once_and_pad_the_shorter_task_with_none():
    rows = {"video": {"target": np.arange(10), "x": np.arange(10) * 2},
            "comment": {"target": np.arange(4) + 100, "x": np.arange(4)}}
    batches = list(joint_batches(rows, 3, seed=7))
    assert len(batches) == 4  # ceil(10 / 3): the longer task decides
    videos = np.concatenate([v["target"] for v, _ in batches])
    comments = np.concatenate([c["target"] for _, c in batches if c is not None])
    assert sorted(videos) == list(range(10)) and sorted(comments) == [100, 101, 102, 103]
    assert [c is None for _, c in batches] == [False, False, True, True]
    for video, _ in batches:  # columns stay aligned row by row
        assert (video["x"] == video["target"] * 2).all()
    again = list(joint_batches(rows, 3, seed=7))
    assert all((a["target"] == b["target"]).all() for (a, _), (b, _) in zip(batches, again))
    other = np.concatenate([v["target"] for v, _ in joint_batches(rows, 3, seed=8)])
    assert not (other == videos).all()  # the seed decides the order


def test_options_are_typed_and_unknown_or_missing_ones_are_refused():
    opts = _options(STAGE1, ["features=F", "out=O", "seeds=2"])
    assert opts["seeds"] == 2 and opts["batch_size"] == STAGE1["batch_size"]
    with pytest.raises(SystemExit, match="unknown"):
        _options(STAGE1, ["features=F", "out=O", "seedz=2"])
    with pytest.raises(SystemExit, match="required"):
        _options(STAGE1, ["features=F"])
