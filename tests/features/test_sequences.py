"""Point-in-time feature logic on hand-written logs; every expected value below is worked out by hand."""

import numpy as np
import pyarrow as pa
import pytest

from core import contract
from core.contract import TASKS
from features.arrays import gather_ranges, sample_excluding, stable_seed
from features.catalog import index_comments, index_videos
from features.interactions import comment_event_rows, publication_rows, video_event_rows
from features.negatives import add_video_negatives, alive_bounds, window_summary
from features.sequences import build_local
from features.stage_a import ANNOTATED_SCHEMA, annotate_video_group
from features.stage_b import USER_ROWS_SCHEMA, global_cuts, global_time_splits, leave_last_out_cuts, user_rows


def by_event(table: pa.Table) -> dict[str, dict]:
    return {row["event_id"]: row for row in table.to_pylist()}


# ------------------------------------------------------------------------------------------------ catalog


def test_index_videos_orders_by_ts_then_id_and_builds_text(tables):
    t = tables(videos=[("v1", "cats", ["pets"], 10), ("v2", "dogs", [], 20), ("va", "ants", ["tiny", "red"], 20),
                       ("v3", "first", [], 5)])
    videos = index_videos(t["videos"])
    assert videos["video_id"].to_pylist() == ["v3", "v1", "v2", "va"]
    assert videos["video_idx"].to_pylist() == [0, 1, 2, 3]
    assert videos["video_idx"].type == pa.int32()
    assert videos["text"].to_pylist() == ["first", "cats pets", "dogs", "ants tiny red"]
    assert videos.column_names == ["video_idx", "video_id", "title", "tags", "author_id", "ts", "text"]


def test_index_comments_drops_unknown_video_and_orders_ties_by_id(tables):
    t = tables(
        videos=[("v3", "first", [], 5), ("v1", "cats", [], 10), ("v2", "dogs", [], 20), ("va", "ants", [], 20)],
        comments=[("c1", "v1", "hi", 12), ("c2", "vzz", "lost", 13), ("c3", "va", "yo", 12), ("c0", "v2", "x", 30)],
    )
    videos = index_videos(t["videos"])  # v3=0, v1=1, v2=2, va=3
    comments, dropped = index_comments(t["comments"], videos)
    assert dropped == 1
    assert comments["comment_id"].to_pylist() == ["c1", "c3", "c0"]
    assert comments["comment_idx"].to_pylist() == [0, 1, 2]
    assert comments["video_idx"].to_pylist() == [1, 3, 2]
    assert comments.column_names == ["comment_idx", "comment_id", "video_id", "video_idx", "author_id", "text",
                                     "parent_id", "ts"]


def test_duplicate_catalog_ids_are_a_clear_error(tables):
    t = tables(videos=[("v1", "a", [], 1), ("v1", "b", [], 2)])
    with pytest.raises(ValueError, match="duplicates.*v1"):
        index_videos(t["videos"])


def test_event_rows_status_and_catalog_video_of_comment(tables):
    t = tables(
        videos=[("v1", "a", [], 1), ("v2", "b", [], 2)],
        comments=[("c1", "v2", "x", 3)],
        video_events=[("e1", "u", "v2", "like", 5), ("e2", "u", "v1", "view", 6), ("e3", "u", "vz", "finish", 7),
                      ("e4", "u", "vz", "view", 8)],
        # e6 names the wrong video: the catalog's video of c1 (v2) wins.
        comment_events=[("e5", "u", "cz", "v1", "like", 5), ("e6", "u", "c1", "v1", "reply", 6)],
    )
    videos = index_videos(t["videos"])
    comments, _ = index_comments(t["comments"], videos)
    rows = video_event_rows(t["video_events"], videos["video_id"].combine_chunks(), ["like", "finish"])
    assert rows["status"].to_pylist() == ["ok", "not_used", "unknown_video", "not_used"]
    assert rows["video_idx"].to_pylist() == [1, 0, -1, -1]
    assert rows["comment_idx"].to_pylist() == [-1, -1, -1, -1]
    rows = comment_event_rows(t["comment_events"], comments["comment_id"].combine_chunks(),
                                  comments["video_idx"].to_numpy(), ["reply"])
    # e5 is a like of an unknown comment: used for popularity, so it counts as unknown rather than unused.
    assert rows["status"].to_pylist() == ["unknown_comment", "ok"]
    assert rows["video_idx"].to_pylist() == [-1, 1]
    assert rows["positive"].to_pylist() == [False, True]
    assert rows["like"].to_pylist() == [True, False]
    with pytest.raises(ValueError, match="missing columns"):
        video_event_rows(t["video_events"].drop_columns(["action"]), videos["video_id"].combine_chunks(), ["like"])


# ------------------------------------------------------------------------------------------------ stage A

# One video v1 (idx 0) with comments c1 (idx 0, ts 12), c2 (idx 1, ts 15), c3 (idx 2, ts 50).
# Likes: c1 @30 @35 @45; c2 @16 @40 @42 @45; c3 @51 @52 @53 @54 @60.
HOT_LOG = dict(
    videos=[("v1", "cats", [], 10)],
    comments=[("c1", "v1", "a", 12), ("c2", "v1", "b", 15), ("c3", "v1", "c", 50)],
    comment_events=[
        *[(f"l1_{ts}", "o", "c1", "v1", "like", ts) for ts in (30, 35, 45)],
        *[(f"l2_{ts}", "o", "c2", "v1", "like", ts) for ts in (16, 40, 42, 45)],
        *[(f"l3_{ts}", "o", "c3", "v1", "like", ts) for ts in (51, 52, 53, 54, 60)],
    ],
)


def video_group(t, positive_comment_actions=("like", "reply", "write")):
    videos = index_videos(t["videos"])
    comments, _ = index_comments(t["comments"], videos)
    group = pa.concat_tables([
        video_event_rows(t["video_events"], videos["video_id"].combine_chunks(), ["like", "finish"]),
        comment_event_rows(t["comment_events"], comments["comment_id"].combine_chunks(),
                               comments["video_idx"].to_numpy(), list(positive_comment_actions)),
        publication_rows(comments),
    ])
    return group.filter(pa.compute.equal(group["status"], "ok"))


def test_hot_comment_as_of_each_video_event(tables):
    times = [10, 12, 13, 16, 17, 31, 36, 41, 46, 60, 61]
    t = tables(**HOT_LOG, video_events=[(f"v@{ts}", "u", "v1", "like", ts) for ts in times])
    out = by_event(annotate_video_group(video_group(t), num_negatives=99, seed=0))
    hot = {ts: out[f"v@{ts}"]["hot"] for ts in times}
    assert hot == {
        10: -1,  # nothing published yet
        12: -1,  # c1 is published at 12, not strictly before
        13: 0,  # c1 alone, no likes
        16: 0,  # c1 0, c2 0 (its like at 16 is not before 16): tie -> earlier published c1
        17: 1,  # c2 1
        31: 0,  # c1 1, c2 1: tie -> c1
        36: 0,  # c1 2, c2 1
        41: 0,  # c1 2, c2 2: tie -> c1
        46: 1,  # c1 3, c2 4
        60: 1,  # c2 4, c3 4 (51..54; 60 not before): tie -> c2 published earlier
        61: 2,  # c3 5
    }
    # Only positive events come out: the likes of user "o" are positive comment events too.
    assert len(out) == len(times) + 12


def test_video_without_comments_has_no_hot_comment(tables):
    t = tables(videos=[("v1", "cats", [], 10)], video_events=[("e1", "u", "v1", "finish", 20)])
    out = annotate_video_group(video_group(t), num_negatives=99, seed=0)
    assert out["hot"].to_pylist() == [-1]
    assert out["negatives"].to_pylist() == [[]]


def test_comment_candidates_and_likes_before_ts(tables):
    t = tables(**{**HOT_LOG, "comment_events": HOT_LOG["comment_events"] + [
        ("q1", "u", "c2", "v1", "reply", 16),
        ("q2", "u", "c1", "v1", "reply", 41),
        ("q3", "u", "c3", "v1", "write", 50),
        ("q4", "u", "c3", "v1", "reply", 61),
    ]})
    out = by_event(annotate_video_group(video_group(t), num_negatives=99, seed=0))
    got = {e: (out[e]["negatives"], out[e]["negative_likes"], out[e]["target_likes"]) for e in ("q1", "q2", "q3", "q4")}
    assert got == {
        "q1": ([0], [0], 0),  # c1, c2 published before 16; c2's like at 16 does not count
        "q2": ([1], [2], 2),  # c2 liked @16 @40; c1 liked @30 @35
        "q3": ([0, 1], [3, 4], 0),  # c3 is published at 50, so it is no candidate of itself and has no likes
        "q4": ([0, 1], [3, 4], 5),  # c3 liked @51..54 and @60
    }
    assert out["q1"]["hot"] == -1 and out["q1"]["comment_idx"] == 1 and out["q1"]["video_idx"] == 0
    # q3 writes c3 at 50: its target did not exist before 50, so it cannot be ranked; q4 replies to it later.
    assert {e: out[e]["rankable"] for e in ("q1", "q2", "q3", "q4")} == {"q1": True, "q2": True, "q3": False,
                                                                        "q4": True}


def test_comment_negatives_are_sampled_by_seed_and_event_id(tables):
    t = tables(**{**HOT_LOG, "comment_events": HOT_LOG["comment_events"] + [("q4", "u", "c3", "v1", "reply", 61)]})
    first = by_event(annotate_video_group(video_group(t), num_negatives=1, seed=7))["q4"]
    again = by_event(annotate_video_group(video_group(t), num_negatives=1, seed=7))["q4"]
    assert first["negatives"] == again["negatives"]
    assert first["negatives"] in ([0], [1])
    # The likes follow the sampled comment: c1 has 3 likes before 61, c2 has 4.
    assert first["negative_likes"] == ([3] if first["negatives"] == [0] else [4])
    assert first["target_likes"] == 5


def test_likes_only_count_when_like_is_not_positive(tables):
    """With likes not positive, like events still make hot comments but are no examples."""
    t = tables(**HOT_LOG, video_events=[("v@17", "u", "v1", "like", 17)])
    out = annotate_video_group(video_group(t, positive_comment_actions=("reply",)), num_negatives=99, seed=0)
    assert out["event_id"].to_pylist() == ["v@17"]
    assert out["hot"].to_pylist() == [1]


def test_hot_comments_match_the_definition_on_a_random_log(tables):
    """The sweep against the definition written out plainly, on many ties (times drawn from 0..19)."""
    rng = np.random.default_rng(1)
    comments = [(f"c{i}", "v1", "x", int(rng.integers(0, 20))) for i in range(6)]
    likes = [(f"l{i}", "o", f"c{rng.integers(0, 6)}", "v1", "like", int(rng.integers(0, 20))) for i in range(40)]
    views = [(f"w{i}", "u", "v1", "like", i) for i in range(21)]
    t = tables(videos=[("v1", "cats", [], 0)], comments=comments, video_events=views, comment_events=likes)
    out = by_event(annotate_video_group(video_group(t), num_negatives=99, seed=0))
    order = sorted(range(6), key=lambda i: (comments[i][3], comments[i][0]))  # comment_idx -> position in `comments`
    for i in range(21):
        published = [k for k in range(6) if comments[order[k]][3] < i]
        n_likes = {k: sum(1 for like in likes if like[2] == comments[order[k]][0] and like[5] < i) for k in published}
        expected = min(published, key=lambda k: (-n_likes[k], k)) if published else -1
        assert out[f"w{i}"]["hot"] == expected, i


# ------------------------------------------------------------------------------------------------ stage B


def annotated(user, video_rows=(), comment_rows=(), unrankable=()):
    """video_rows: (event_id, video_idx, ts, hot); comment_rows: (event_id, video_idx, comment_idx, ts);
    unrankable: event ids of comment events whose comment was not published before them."""
    rows = [dict(kind=0, event_id=e, user_id=user, video_idx=v, comment_idx=-1, ts=ts, hot=h, negatives=[],
                 target_likes=0, negative_likes=[], rankable=True) for e, v, ts, h in video_rows]
    rows += [dict(kind=1, event_id=e, user_id=user, video_idx=v, comment_idx=c, ts=ts, hot=-1, negatives=[7, 8],
                  target_likes=3, negative_likes=[1, 2], rankable=e not in unrankable) for e, v, c, ts in comment_rows]
    rows = rows[::-1]  # user_rows must not rely on input order
    return pa.Table.from_pylist(rows, schema=ANNOTATED_SCHEMA)


U1_VIDEO = [("a", 0, 13, 0), ("b", 0, 17, 1), ("d", 4, 36, -1), ("c", 1, 36, 2), ("e", 3, 41, -1)]
U1_COMMENT = [("f", 0, 0, 30), ("g", 0, 1, 36), ("h", 0, 1, 37), ("i", 1, 2, 38), ("j", 0, 5, 39), ("k", 0, 6, 45)]
HIST = ["hist_video", "hist_video_hot", "hist_video_ts", "hist_cmt_video", "hist_cmt_comments", "hist_cmt_ts"]


def hist(row):
    return tuple(row[c] for c in HIST)


def test_user_rows_histories_ties_and_splits():
    rows = user_rows(annotated("u1", U1_VIDEO, U1_COMMENT), max_history=50)
    got = by_event(rows.filter(pa.compute.not_equal(rows["row_kind"], "user")))
    none = ([], [], [], [], [], [])
    # Video task, by (ts, event_id): a@13, b@17, c@36, d@36, e@41.
    assert hist(got["a"]) == none
    assert hist(got["b"]) == ([0], [0], [13], [], [], [])
    # c and d share ts 36: neither sees the other, nor the comment event g@36.
    assert hist(got["c"]) == ([0, 0], [0, 1], [13, 17], [0], [0, -1, -1], [30])
    assert hist(got["d"]) == hist(got["c"])
    # v0's record: c0, c1 (twice: kept once), c5 -> latest 3 [0, 1, 5] @39; v1's record @38 comes first.
    assert hist(got["e"]) == ([0, 0, 1, 4], [0, 1, 2, -1], [13, 17, 36, 36], [1, 0], [2, -1, -1, 0, 1, 5], [38, 39])
    # Leave-last-out cuts the user's time once for both tasks: test from e@41 (the earlier of the tasks' last
    # examples e@41 and k@45), valid from d@36 (the earlier of the second-to-last d@36 and j@39), so c@36 is
    # valid too and nothing of either task after e trains.
    assert {e: got[e]["split"] for e in "abcde"} == {"a": "dropped", "b": "train", "c": "valid", "d": "valid",
                                                  "e": "test"}
    assert {e: got[e]["target"] for e in "abcde"} == {"a": 0, "b": 0, "c": 1, "d": 4, "e": 3}
    # Comment task.
    assert hist(got["f"]) == ([0, 0], [0, 1], [13, 17], [], [], [])
    assert hist(got["g"]) == ([0, 0], [0, 1], [13, 17], [0], [0, -1, -1], [30])
    assert hist(got["h"])[3:] == ([0], [0, 1, -1], [36])
    assert hist(got["h"])[0] == [0, 0, 1, 4]
    assert hist(got["i"])[3:] == ([0], [0, 1, -1], [37])
    assert hist(got["j"])[3:] == ([0, 1], [0, 1, -1, 2, -1, -1], [37, 38])
    assert hist(got["k"]) == ([0, 0, 1, 4, 3], [0, 1, 2, -1, -1], [13, 17, 36, 36, 41], [1, 0],
                              [2, -1, -1, 0, 1, 5], [38, 39])
    assert [got[e]["split"] for e in "fghijk"] == ["train"] + ["valid"] * 4 + ["test"]
    assert (got["i"]["query_video"], got["i"]["target"]) == (1, 2)
    assert (got["f"]["negatives"], got["f"]["negative_likes"], got["f"]["target_likes"]) == ([7, 8], [1, 2], 3)
    assert got["a"]["query_video"] == -1

    user = rows.filter(pa.compute.equal(rows["row_kind"], "user")).to_pylist()
    assert len(user) == 1 and user[0]["user_id"] == "u1"
    # As of the end: v0's record is [1, 5, 6] @45 (c0 pushed out by c6), after v1's @38.
    assert hist(user[0]) == ([0, 0, 1, 4, 3], [0, 1, 2, -1, -1], [13, 17, 36, 36, 41], [1, 0],
                             [2, -1, -1, 1, 5, 6], [38, 45])
    assert rows.schema == USER_ROWS_SCHEMA


def test_user_rows_keep_the_latest_max_history():
    rows = user_rows(annotated("u1", U1_VIDEO, U1_COMMENT), max_history=2)
    got = by_event(rows.filter(pa.compute.not_equal(rows["row_kind"], "user")))
    assert hist(got["e"]) == ([1, 4], [2, -1], [36, 36], [1, 0], [2, -1, -1, 0, 1, 5], [38, 39])
    user = user_rows(annotated("u1", U1_VIDEO, U1_COMMENT), max_history=1).to_pylist()[-1]
    assert hist(user) == ([3], [-1], [41], [0], [1, 5, 6], [45])


def test_user_with_only_comment_events():
    rows = user_rows(annotated("u3", comment_rows=[("x1", 2, 3, 27), ("x2", 2, 4, 28), ("x3", 0, 0, 31)]),
                         max_history=50)
    got = by_event(rows.filter(pa.compute.not_equal(rows["row_kind"], "user")))
    assert hist(got["x1"]) == ([], [], [], [], [], [])
    assert hist(got["x2"]) == ([], [], [], [2], [3, -1, -1], [27])
    assert hist(got["x3"]) == ([], [], [], [2], [3, 4, -1], [28])
    assert [got[e]["split"] for e in ("x1", "x2", "x3")] == ["dropped", "train", "test"]
    user = rows.to_pylist()[-1]
    assert user["row_kind"] == "user" and user["user_id"] == "u3"
    assert hist(user) == ([], [], [], [2, 0], [3, 4, -1, 0, -1, -1], [28, 31])


def test_a_written_comment_is_history_but_not_an_example():
    # x2 writes comment 4 at 28 (published at 28 itself): unrankable, yet x3 still sees it in its record.
    rows = user_rows(annotated("u3", comment_rows=[("x1", 2, 3, 27), ("x2", 2, 4, 28), ("x3", 0, 0, 31)],
                                   unrankable={"x2"}), max_history=50)
    got = by_event(rows.filter(pa.compute.not_equal(rows["row_kind"], "user")))
    assert [got[e]["split"] for e in ("x1", "x2", "x3")] == ["dropped", "unrankable", "train"]
    assert hist(got["x3"]) == ([], [], [], [2], [3, 4, -1], [28])


def test_single_kept_example_is_train():
    rows = user_rows(annotated("u4", video_rows=[("a", 1, 10, -1), ("b", 2, 20, -1)]), max_history=50)
    got = by_event(rows.filter(pa.compute.not_equal(rows["row_kind"], "user")))
    assert (got["a"]["split"], got["b"]["split"]) == ("dropped", "train")


NEVER = np.iinfo(np.int64).max


@pytest.mark.parametrize("ts_by_task, cuts", [
    ([[10, 20, 30], [5, 25]], (20, 25)),  # test at the earlier last example, valid at the earlier second-to-last
    ([[1, 2, 3, 4, 5], []], (4, 5)),
    ([[10, 20], []], (20, 20)),  # two examples: train, test; no valid
    ([[10], [7]], (NEVER, NEVER)),  # one example per task: train
    ([[10, 20, 30], [1, 2]], (2, 2)),  # the valid cut never comes after the test cut
])
def test_leave_last_out_cuts(ts_by_task, cuts):
    assert leave_last_out_cuts([np.array(t) for t in ts_by_task]) == cuts


def test_comment_candidates_leave_out_the_users_earlier_positives():
    # The user engages with comments 0 @30, 1 @31 and 5 @32 under video 0 and comment 2 @33 under video 1.
    rows = [dict(kind=1, event_id=e, user_id="u", video_idx=v, comment_idx=c, ts=ts, hot=-1, negatives=neg,
                 target_likes=0, negative_likes=[10 + n for n in neg], rankable=True)
            for e, v, c, ts, neg in [("p", 0, 0, 30, [1, 9]), ("q", 0, 1, 31, [0, 5, 7]), ("r", 0, 5, 32, [0, 1, 7, 8]),
                                     ("s", 1, 2, 33, [5, 6])]]
    out = by_event(user_rows(pa.Table.from_pylist(rows, schema=ANNOTATED_SCHEMA), max_history=50))
    assert (out["q"]["negatives"], out["q"]["negative_likes"]) == ([5, 7], [15, 17])  # 0 @30 is out; 5 @32 is later
    assert (out["r"]["negatives"], out["r"]["negative_likes"]) == ([7, 8], [17, 18])  # 0 and 1 came before
    assert out["s"]["negatives"] == [5, 6]  # 5 is a positive under another video: a fair negative here
    assert out["p"]["negatives"] == [1, 9] and out["q"]["target"] == 1  # 1 is liked only later


# ------------------------------------------------------------------------------------------------ negatives


def video_rows(rows):
    """rows: (event_id, ts, target) -> stage B video rows with empty negatives."""
    return pa.Table.from_pylist([dict(row_kind="video", split="train", user_id="u", event_id=e, ts=ts, target=t,
                                      query_video=-1, negatives=[]) for e, ts, t in rows], schema=USER_ROWS_SCHEMA)


VIDEO_TS = np.array([10, 20, 20, 30, 40])  # video_idx 0..4


def test_video_negatives_published_before_ts_never_the_target():
    batch = video_rows([("n1", 25, 1), ("n2", 10, 0), ("n3", 41, 4), ("n4", 35, 4)])
    out = by_event(add_video_negatives(batch, VIDEO_TS, num_negatives=5, seed=0))
    assert out["n1"]["negatives"] == [0, 2]  # videos 0, 1, 2 are before 25; 1 is the target
    assert out["n2"]["negatives"] == []  # nothing before 10
    assert out["n3"]["negatives"] == [0, 1, 2, 3]
    assert out["n4"]["negatives"] == [0, 1, 2, 3]  # the target, published at 40, is not before 35 anyway
    windowed = by_event(add_video_negatives(batch, VIDEO_TS, num_negatives=5, seed=0, window_ms=15,
                                                protocol="alive_window"))
    assert windowed["n3"]["negatives"] == [3]  # published in [26, 41): videos 3 and 4 (the target)
    assert windowed["n3"]["negatives_uniform_all"] == [0, 1, 2, 3]
    assert windowed["n1"]["negatives"] == [0, 2]  # [10, 25): videos 0, 1, 2 (0 at 10 = 25 - 15 is inside); 1 is the target


def test_video_negatives_sample_is_fixed_by_seed_and_event_id():
    batch = video_rows([("n3", 41, 4), ("n5", 41, 4)])
    a = by_event(add_video_negatives(batch, VIDEO_TS, num_negatives=2, seed=3))
    b = by_event(add_video_negatives(batch.take([1, 0]), VIDEO_TS, num_negatives=2, seed=3))
    assert a == b  # independent of batch order
    for row in a.values():
        assert len(row["negatives"]) == 2 and set(row["negatives"]) <= {0, 1, 2, 3}
    seen = {tuple(add_video_negatives(batch, VIDEO_TS, num_negatives=2, seed=s)["negatives"][0].as_py())
            for s in range(20)}
    assert len(seen) > 1  # the seed matters


def test_sample_excluding_and_stable_seed():
    rng = np.random.default_rng(0)
    assert sample_excluding(rng, 0, 10, 3, 100).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert sample_excluding(rng, 5, 8, 0, 100).tolist() == [5, 6, 7]
    assert sample_excluding(rng, 5, 5, 5, 3).tolist() == []
    picks = sample_excluding(rng, 0, 1000, 500, 50)
    assert len(set(picks.tolist())) == 50 and 500 not in picks.tolist()
    assert stable_seed(0, "video", "e1") == stable_seed(0, "video", "e1")
    assert len({stable_seed(0, "video", "e1"), stable_seed(1, "video", "e1"),
                stable_seed(0, "comment", "e1"), stable_seed(0, "video", "e2")}) == 4


def test_gather_ranges():
    offsets, flat = gather_ranges(np.array([10, 11, 12, 13]), np.array([1, 0, 2]), np.array([3, 0, 4]))
    assert offsets.tolist() == [0, 2, 2, 4]
    assert flat.tolist() == [11, 12, 12, 13]


# ------------------------------------------------------------------------------------------------ splits


def test_user_rows_global_time_split():
    # Kept video examples b@17, c@36, d@36, e@41; cuts valid at 36, test at 41.
    rows = user_rows(annotated("u1", U1_VIDEO, U1_COMMENT), max_history=50, split="global_time",
                         valid_ts=36, test_ts=41)
    got = by_event(rows.filter(pa.compute.not_equal(rows["row_kind"], "user")))
    assert {e: got[e]["split"] for e in "abcde"} == {"a": "dropped", "b": "train", "c": "valid", "d": "valid",
                                                  "e": "test"}
    # Comment events f@30 g@36 h@37 i@38 j@39 k@45: only k is at or after 41.
    assert [got[e]["split"] for e in "fghijk"] == ["train", "valid", "valid", "valid", "valid", "test"]
    with pytest.raises(ValueError, match="split policy"):
        user_rows(annotated("u1", U1_VIDEO), max_history=5, split="random")


def test_user_rows_emit_after_ts_keeps_later_examples_and_the_user_row():
    rows = user_rows(annotated("u1", U1_VIDEO, U1_COMMENT), max_history=50, emit_after_ts=38)
    assert rows["event_id"].to_pylist()[:-1] == ["j", "e", "k"]  # ts 39, 41, 45
    assert rows["row_kind"].to_pylist()[-1] == "user"
    full = by_event(user_rows(annotated("u1", U1_VIDEO, U1_COMMENT), max_history=50))
    assert hist(by_event(rows)["e"]) == hist(full["e"])


def test_global_cuts():
    ts = np.array([50, 10, 20, 30, 40, 60, 70, 80, 90, 100])
    # 10 times: valid+test = 30% -> index 7 of the sorted times (80); test 10% -> index 9 (100).
    assert global_cuts(ts, 0.2, 0.1) == (80, 100)
    assert global_cuts(ts, 0.0, 0.0) == (101, 101)  # nothing valid or test
    assert global_cuts(np.array([], np.int64), 0.1, 0.1) == (0, 0)
    splits = global_time_splits(np.array([79, 80, 99, 100]), 80, 100).tolist()
    assert splits == ["train", "valid", "valid", "test"]


# ------------------------------------------------------------------------------------------------ late events


def test_late_events_in_the_file_order_change_nothing(tables):
    """Events that arrive after later ones (late) are placed by their ts: the rows equal an in-order log."""
    from tests.features.test_build import LOG

    names = ("videos", "comments", "video_events", "comment_events")
    in_order = build_local(*(tables(**LOG)[t] for t in names), num_negatives=2)["rows"]
    late = {**LOG, "video_events": LOG["video_events"][::-1], "comment_events": LOG["comment_events"][3:] +
            LOG["comment_events"][:3], "comments": LOG["comments"][::-1]}
    shuffled = build_local(*(tables(**late)[t] for t in names), num_negatives=2)["rows"]
    key = [("row_kind", "ascending"), ("event_id", "ascending"), ("user_id", "ascending")]
    assert shuffled.sort_by(key).equals(in_order.sort_by(key))


def test_cut_ts_leaves_out_events_after_the_watermark(tables):
    from tests.features.test_build import LOG

    names = ("videos", "comments", "video_events", "comment_events")
    out = build_local(*(tables(**LOG)[t] for t in names), num_negatives=2, cut_ts=36)
    rows = out["rows"].filter(pa.compute.not_equal(out["rows"]["row_kind"], "user"))
    assert max(rows["ts"].to_pylist()) == 36
    # u1's state as of 36: video events 13, 14 (view: not positive), 17, 36, 36 -> four; comment ce2@30, ce3@36.
    by_user = {r["user_id"]: r for r in out["users"].to_pylist()}
    u1 = by_user["u1"]
    assert u1["hist_video_ts"] == [13, 17, 36, 36] and u1["hist_cmt_ts"] == [36]
    assert "u2" not in by_user  # u2's only event is at 50


# ------------------------------------------------------------------------------------------------ property


def random_log(rng: np.random.Generator, n_users=6, n_videos=8, n_comments=14, n_video_events=60,
               n_comment_events=50, t_max=60):
    """A small log with many equal timestamps, unknown ids, videos without comments and comment-only users."""
    videos = [(f"v{i}", f"title {i}", [f"t{i % 3}"], int(rng.integers(0, t_max))) for i in range(n_videos)]
    # Comments only under the first half of the videos: the rest have none.
    comments = [(f"c{i}", f"v{int(rng.integers(0, n_videos // 2))}", f"text {i}", int(rng.integers(0, t_max)))
                for i in range(n_comments)]
    video_of = {c: v for c, v, _, _ in comments}
    video_events = [(f"e{i}", f"u{int(rng.integers(0, n_users - 1))}", f"v{int(rng.integers(0, n_videos + 1))}",
                     str(rng.choice(["view", "like", "finish", "share"])), int(rng.integers(0, t_max)))
                    for i in range(n_video_events)]
    comment_events = []
    for i in range(n_comment_events):
        c = f"c{int(rng.integers(0, n_comments + 1))}"  # c{n_comments} is unknown
        # The last user has comment events only.
        comment_events.append((f"k{i}", f"u{int(rng.integers(0, n_users))}", c, video_of.get(c, "v0"),
                               str(rng.choice(["like", "reply", "write"])), int(rng.integers(0, t_max))))
    return dict(videos=videos, comments=comments, video_events=video_events, comment_events=comment_events)


@pytest.mark.parametrize("seed", range(8))
def test_nothing_at_or_after_an_example_enters_it(tables, seed):
    """On random logs: every history element, hot comment and candidate is strictly before the example."""
    log = random_log(np.random.default_rng(seed))
    t = tables(**log)
    max_history = 4
    out = build_local(t["videos"], t["comments"], t["video_events"], t["comment_events"],
                          max_history=max_history, num_negatives=3, seed=seed)
    video_ts = out["videos"]["ts"].to_pylist()
    comment_ts = out["comments"]["ts"].to_pylist()
    comment_video = out["comments"]["video_idx"].to_pylist()
    # When each user interacted with each comment (positive comment events), to check comment records.
    touched: dict[tuple, list[int]] = {}
    for e, u, c, _, a, ts in log["comment_events"]:
        touched.setdefault((u, c), []).append(ts)
    comment_ids = out["comments"]["comment_id"].to_pylist()
    n_examples = 0
    for task in TASKS:
        for split in contract.SPLITS:
            for row in out[f"{task}/{split}"].to_pylist():
                n_examples += 1
                ts = row["ts"]
                assert len(row["hist_video"]) <= max_history and len(row["hist_cmt_video"]) <= max_history
                assert all(h < ts for h in row["hist_video_ts"] + row["hist_cmt_ts"])
                assert row["hist_video_ts"] == sorted(row["hist_video_ts"])
                for hot, h_ts in zip(row["hist_video_hot"], row["hist_video_ts"]):
                    assert hot == -1 or comment_ts[hot] < h_ts  # hot as of the history element's time
                comments = [c for c in row["hist_cmt_comments"] if c >= 0]
                assert all(min(touched[(row["user_id"], comment_ids[c])]) < ts for c in comments)
                if task == "video":
                    assert row["target"] not in row["negatives"]
                    assert all(video_ts[n] < ts for n in row["negatives"])
                    eligible = sum(1 for i, v in enumerate(video_ts) if v < ts and i != row["target"])
                    assert len(row["negatives"]) == min(3, eligible)
                else:
                    assert row["target"] not in row["negatives"]
                    assert all(comment_ts[n] < ts and comment_video[n] == row["query_video"]
                               for n in row["negatives"])
                    assert comment_video[row["target"]] == row["query_video"]
    assert n_examples > 20  # the property is checked on a real number of examples


def test_every_protocol_samples_only_videos_that_existed_and_alive_window_only_inside_it():
    rng = np.random.default_rng(7)
    video_ts = np.sort(rng.integers(0, 1000, size=60))
    rows = [(f"e{i}", int(t), int(rng.integers(0, np.searchsorted(video_ts, t)))) for i, t in
            enumerate(rng.integers(200, 1100, size=40))]
    inter_ts = rng.integers(0, 1100, size=300)
    inter_video = rng.integers(0, 60, size=300)
    out = by_event(add_video_negatives(video_rows(rows), video_ts, num_negatives=10, seed=1, window_ms=150,
                                           protocol="popularity_at_t", interaction_ts=inter_ts,
                                           interaction_video=inter_video))
    for event_id, ts, target in rows:
        row = out[event_id]
        assert row["negatives"] == row["negatives_popularity_at_t"]
        for name in contract.PROTOCOL_COLUMNS:
            negatives = row[name]
            assert target not in negatives and len(set(negatives)) == len(negatives)
            assert all(video_ts[v] < ts for v in negatives), name
        assert all(ts - 150 <= video_ts[v] for v in row["negatives_alive_window"])
        assert len(row["negatives_uniform_all"]) == min(10, int(np.sum(video_ts < ts)) - 1)


def test_popularity_at_t_counts_only_interactions_strictly_before_ts():
    # Videos 0..4 published at 10 20 20 30 40. Before 35: video 3 had 5 interactions, video 0 one at 34;
    # video 2's are at 35 (not before) and later. With 1 negative and target 1, video 3 wins almost always.
    inter_ts = np.array([31, 32, 33, 33, 34, 34, 35, 35, 35, 35, 36])
    inter_video = np.array([3, 3, 3, 3, 3, 0, 2, 2, 2, 2, 2])
    picks = []
    for seed in range(40):
        out = add_video_negatives(video_rows([("p", 35, 1)]), VIDEO_TS, num_negatives=1, seed=seed,
                                      window_ms=5, protocol="popularity_at_t", interaction_ts=inter_ts,
                                      interaction_video=inter_video)
        picks.append(out["negatives"][0].as_py()[0])
    assert set(picks) <= {0, 3} and picks.count(3) >= 25  # probability 5/6 per draw; never video 2
    # Three negatives: both videos with interactions, and one of the zero-count ones (2) only to fill up.
    out = add_video_negatives(video_rows([("p", 35, 1)]), VIDEO_TS, num_negatives=3, seed=0, window_ms=5,
                                  protocol="popularity_at_t", interaction_ts=inter_ts, interaction_video=inter_video)
    assert out["negatives"][0].as_py() == [0, 2, 3]


def test_each_event_has_its_own_alive_window():
    # A busy start, a quiet period (nothing from 30 to 100), then a busy end.
    video_ts = np.array([0, 10, 20, 30, 100, 105, 105, 110])
    ts = np.array([15, 31, 101, 106, 120])
    lo, hi = alive_bounds(video_ts, ts, num_negatives=2)
    # 2 negatives need 3 videos: @15 only 2 exist (all of them); @31 the 3 newest are 10, 20, 30; @101 the quiet
    # period reaches back to 20; @106 the two at 105 and 100; @120 105, 105, 110 (ties at the oldest one stay in).
    assert [video_ts[a:b].tolist() for a, b in zip(lo, hi)] == [[0, 10], [10, 20, 30], [20, 30, 100],
                                                               [100, 105, 105], [105, 105, 110]]
    # A busy event's pool no longer depends on the quiet period elsewhere: @120 spans 15 ms, not 81.
    # W_t = t - the oldest pool member: 15, 21, 81, 6, 15 -> sorted 6 15 15 21 81; p90 = 21 + 0.6 x 60.
    assert window_summary(video_ts, ts, lo, hi) == pytest.approx({"events": 5, "min_ms": 6, "median_ms": 15.0,
                                                                  "p90_ms": 57.0, "max_ms": 81})
    # A fixed W instead: the same range for every event.
    lo, hi = alive_bounds(video_ts, ts, num_negatives=2, window_ms=10)
    assert [video_ts[a:b].tolist() for a, b in zip(lo, hi)] == [[10], [30], [100], [100, 105, 105], [110]]
    # The stored alive_window negatives come from each event's own pool.
    rows = video_rows([("p", 101, 4), ("q", 120, 7)])
    out = by_event(add_video_negatives(rows, video_ts, num_negatives=2, seed=0, protocol="alive_window"))
    assert sorted(out["p"]["negatives"]) == [2, 3] and sorted(out["q"]["negatives"]) == [5, 6]


@pytest.mark.parametrize("seed", range(6))
def test_global_time_keeps_the_evaluation_period_out_of_training(tables, seed):
    """On random logs under split=global_time: every train example and everything in it (history elements,
    candidates) lie before the valid cut; every valid example before the test cut."""
    log = random_log(np.random.default_rng(100 + seed))
    t = tables(**log)
    valid_ts, test_ts = 30, 45
    out = build_local(t["videos"], t["comments"], t["video_events"], t["comment_events"], max_history=5,
                      num_negatives=3, seed=seed, split="global_time", valid_ts=valid_ts, test_ts=test_ts)
    video_ts, comment_ts = out["videos"]["ts"].to_pylist(), out["comments"]["ts"].to_pylist()
    seen = 0
    for task in TASKS:
        for split, bound in (("train", valid_ts), ("valid", test_ts)):
            for row in out[f"{task}/{split}"].to_pylist():
                seen += 1
                assert row["ts"] < bound
                assert all(h < bound for h in row["hist_video_ts"] + row["hist_cmt_ts"])
                published = video_ts if task == "video" else comment_ts
                assert all(published[n] < bound for n in row["negatives"])
        for row in out[f"{task}/test"].to_pylist():
            assert row["ts"] >= test_ts
    assert seen > 0


@pytest.mark.parametrize("seed", range(4))
def test_no_comment_candidate_is_an_earlier_positive_of_the_same_user_on_that_video(tables, seed):
    log = random_log(np.random.default_rng(200 + seed))
    t = tables(**log)
    out = build_local(t["videos"], t["comments"], t["video_events"], t["comment_events"], num_negatives=20,
                      seed=seed, split="global_time", valid_ts=30, test_ts=45)
    index = {c: i for i, c in enumerate(out["comments"]["comment_id"].to_pylist())}
    positives: dict[str, list] = {}
    for _, user, comment, _, action, ts in log["comment_events"]:
        if comment in index and action in ("like", "reply", "write"):
            positives.setdefault(user, []).append((ts, index[comment]))
    checked = 0
    for split in contract.SPLITS:
        for row in out[f"comment/{split}"].to_pylist():
            # Candidates are comments under the query video, so any positive of the user among them is one on it.
            earlier = {c for ts, c in positives[row["user_id"]] if ts <= row["ts"]} - {row["target"]}
            assert not set(row["negatives"]) & earlier
            assert len(row["negatives"]) == len(row["negative_likes"])
            checked += 1
    assert checked > 0
