"""The pandas baseline of the features benchmark: hand-worked rows, and the same rows as build_local on a
generated log (the Ray build's comparison is in test_benchmark.py)."""

import numpy as np
import pyarrow.json as pajson
import pytest

from benchmarks.pandas_features import build_pandas
from core import contract
from core.contract import TASKS
from devtools.generator import GeneratorConfig, generate
from features.sequences import build_local
from ingestion.schema import ARROW_SCHEMA, TABLES

NAMES = ("videos", "comments", "video_events", "comment_events")

# Videos v1=0 (ts 10), v2=1 (20), v3=2 (25, no comments); comments c1=0 (v1, 11), c2=1 (v1, 12), c3=2 (v2, 21).
# u1 has two positive video events at the same ts 15 and a "view" (not positive); u2 has only comment events.
LOG = dict(
    videos=[("v1", "cats", [], 10), ("v2", "dogs", [], 20), ("v3", "news", [], 25)],
    comments=[("c1", "v1", "a", 11), ("c2", "v1", "b", 12), ("c3", "v2", "c", 21)],
    video_events=[("e1", "u1", "v1", "finish", 15), ("e2", "u1", "v2", "like", 15), ("e3", "u1", "v1", "view", 16),
                  ("e4", "u1", "v3", "finish", 30)],
    comment_events=[("k1", "u2", "c2", "v1", "like", 13), ("k2", "u2", "c1", "v1", "reply", 14),
                    ("k3", "u1", "c3", "v2", "write", 22)],
)


def test_hand_worked_rows(tables):
    out = build_pandas(*(tables(**LOG)[n] for n in NAMES), num_negatives=5, protocol="uniform_all")

    # e1 and e2 share ts 15: neither sees the other, both histories are empty -> dropped; e4 @30 sees both
    # (ordered by event_id) with v1's hot comment c2 (1 like @13, c1 none), v2 none yet; and u1's record of v2.
    (e4,) = out["video/train"].to_pylist()
    assert (e4["event_id"], e4["target"]) == ("e4", 2)
    assert (e4["hist_video"], e4["hist_video_hot"], e4["hist_video_ts"]) == ([0, 1], [1, -1], [15, 15])
    assert (e4["hist_cmt_video"], e4["hist_cmt_comments"], e4["hist_cmt_ts"]) == ([1], [2, -1, -1], [22])
    # Videos published before 30 other than the target: v1, v2 (both also have one interaction before 30).
    assert e4["negatives"] == e4["negatives_uniform_all"] == e4["negatives_popularity_at_t"] == [0, 1]
    assert len(out["video/valid"]) == len(out["video/test"]) == 0

    comment = {r["event_id"]: r for r in out["comment/train"].to_pylist()}
    assert sorted(comment) == ["k2", "k3"]  # k1 @13 is u2's first event: empty histories, dropped
    k2, k3 = comment["k2"], comment["k3"]
    # k2: c1 under v1 @14; c2 was published @12 and liked @13; u2's record of v1 holds c2.
    assert (k2["query_video"], k2["target"], k2["target_likes"]) == (0, 0, 0)
    # c2 is the only other comment published before @14, and u2 liked it @13: an earlier positive of the user
    # on that video is not a negative, so k2 has no candidate besides its target.
    assert (k2["negatives"], k2["negative_likes"]) == ([], [])
    assert (k2["hist_video"], k2["hist_cmt_video"], k2["hist_cmt_comments"], k2["hist_cmt_ts"]) == ([], [0], [1, -1, -1], [13])
    # k3: c3 is the only comment of v2, so no candidates; u1's two video events @15 are its history.
    assert (k3["query_video"], k3["target"], k3["negatives"], k3["negative_likes"]) == (1, 2, [], [])
    assert (k3["hist_video"], k3["hist_video_hot"], k3["hist_cmt_video"]) == ([0, 1], [1, -1], [])

    users = {r["user_id"]: r for r in out["users"].to_pylist()}
    assert (users["u1"]["hist_video"], users["u1"]["hist_video_hot"], users["u1"]["hist_video_ts"]) == (
        [0, 1, 2], [1, -1, -1], [15, 15, 30])
    # u2 commented c2 then c1 under v1: one record, oldest first, its time the latest interaction.
    assert (users["u2"]["hist_video"], users["u2"]["hist_cmt_video"], users["u2"]["hist_cmt_comments"],
            users["u2"]["hist_cmt_ts"]) == ([], [0], [1, 0, -1], [14])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    generate(folder, GeneratorConfig(users=120, seed=3))
    out = {}
    for name in TABLES:
        schema = ARROW_SCHEMA[name]
        table = pajson.read_json(folder / f"{name}.jsonl", parse_options=pajson.ParseOptions(explicit_schema=schema))
        out[name] = table.select(schema.names).cast(schema)
    return out


@pytest.mark.parametrize("split", ["leave_last_out", "global_time"])
def test_same_rows_as_build_local_on_a_generated_log(generated, split):
    args = [generated[n] for n in NAMES]
    ts = np.sort(generated["video_events"]["ts"].to_numpy())
    kwargs = dict(num_negatives=7, max_history=4, split=split, valid_ts=int(ts[len(ts) // 2]),
                  test_ts=int(ts[3 * len(ts) // 4]))
    want = build_local(*args, **kwargs)
    got = build_pandas(*args, **kwargs)
    for name in ["users", *(f"{t}/{s}" for t in TASKS for s in contract.SPLITS)]:
        key = "user_id" if name == "users" else "event_id"
        assert len(got[name]) > 0, name
        assert got[name].sort_by(key).equals(want[name].sort_by(key)), name
