"""Stage B, per user: both histories as of each example, the split of each example, and the user's histories as
of the build's cut. Input: one user's annotated positive events (stage A's ANNOTATED_SCHEMA rows); output:
USER_ROWS_SCHEMA rows, video and comment examples plus one "user" row. Pure functions on Arrow tables.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.contract import COMMENTS_PER_RECORD, EXAMPLE_SCHEMA, HISTORY_FIELDS
from features.arrays import gather_ranges, list_array, sort_by_time
from features.interactions import KIND_COMMENT_EVENT, KIND_VIDEO_EVENT
from features.stage_a import ANNOTATED_SCHEMA

SPLIT_POLICIES = ("leave_last_out", "global_time")

# Stage B output: video examples, comment examples and one "user" row per user, in one table so that one
# pass over a user's events produces all of them. `split` is train/valid/test, "dropped" (both histories empty),
# "unrankable" (a comment event whose comment was not published before it) or "" (user rows).
USER_ROWS_SCHEMA = pa.schema([
    ("row_kind", pa.string()),  # "video", "comment" or "user"
    ("split", pa.string()),
    ("user_id", pa.string()),
    ("event_id", pa.string()),
    ("ts", pa.int64()),
    ("target", pa.int32()),
    ("query_video", pa.int32()),
    *HISTORY_FIELDS,
    ("negatives", pa.list_(pa.int32())),
    ("target_likes", pa.int32()),
    ("negative_likes", pa.list_(pa.int32())),
])


def leave_last_out_cuts(ts_by_task: list[np.ndarray]) -> tuple[int, int]:
    """One user's (valid_ts, test_ts) for leave-last-out, shared by both tasks: the test cut is the earliest of
    the tasks' last example times (over tasks with at least 2 examples), the valid cut the earliest of their
    second-to-last times (tasks with at least 3), never after the test cut. Every example of the user at or
    after the test cut is test, so no train or valid example of either task comes after a test event.
    ts_by_task: each task's kept example times, sorted."""
    never = np.iinfo(np.int64).max
    test = min((int(t[-1]) for t in ts_by_task if len(t) >= 2), default=never)
    valid = min((int(t[-2]) for t in ts_by_task if len(t) >= 3), default=never)
    return min(valid, test), test


def global_time_splits(ts: np.ndarray, valid_ts: int, test_ts: int) -> np.ndarray:
    """Global time cut: ts < valid_ts -> train, valid_ts <= ts < test_ts -> valid, ts >= test_ts -> test."""
    if valid_ts > test_ts:
        raise ValueError(f"valid_ts {valid_ts} must be <= test_ts {test_ts}")
    return np.where(ts < valid_ts, "train", np.where(ts < test_ts, "valid", "test")).astype(object)


def _comment_snapshots(
    rec_video: np.ndarray, rec_comment: np.ndarray, rec_ts: np.ndarray, applied: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The comment history after the first k comment events (sorted by (ts, event_id)), for each k in
    `applied` (sorted, unique).

    A record is a video plus the last 3 distinct comments the user interacted with under it (oldest first,
    -1 padded); its time is its latest interaction; records are ordered by that time, newest last.
    Returns (offsets [K+1], video [R], comments [R*3], ts [R]) over the K snapshots.
    """
    records: dict[int, list[int]] = {}  # video -> comments; dict order = record order (updated -> moved last)
    record_ts: dict[int, int] = {}
    offsets = [0]
    out_video: list[int] = []
    out_comments: list[int] = []
    out_ts: list[int] = []
    done = 0
    for k in applied:
        for e in range(done, int(k)):
            video, comment = int(rec_video[e]), int(rec_comment[e])
            kept = [c for c in records.pop(video, []) if c != comment] + [comment]
            records[video] = kept[-COMMENTS_PER_RECORD:]
            record_ts[video] = int(rec_ts[e])
        done = int(k)
        latest = list(islice(reversed(records.items()), max_history))[::-1]
        for video, comments in latest:
            out_video.append(video)
            out_comments.extend(comments + [-1] * (COMMENTS_PER_RECORD - len(comments)))
            out_ts.append(record_ts[video])
        offsets.append(len(out_video))
    return (np.asarray(offsets, np.int64), np.asarray(out_video, np.int32),
            np.asarray(out_comments, np.int32), np.asarray(out_ts, np.int64))


def user_histories(group: pa.Table, query_ts: np.ndarray, max_history: int) -> dict[str, pa.ListArray]:
    """Both histories of one user as of each time in query_ts (events strictly before it count).

    `group` holds the user's annotated positive events (ANNOTATED_SCHEMA), sorted by (ts, event_id).
    """
    kind = group["kind"].to_numpy()
    ts = group["ts"].to_numpy()
    video_idx = group["video_idx"].to_numpy()
    n_query = len(query_ts)

    vid = kind == KIND_VIDEO_EVENT
    v_ts = ts[vid]
    end = np.searchsorted(v_ts, query_ts, side="left")  # events strictly before each query
    start = np.maximum(end - max_history, 0)
    out = {}
    for name, values, value_type in (
        ("hist_video", video_idx[vid], pa.int32()),
        ("hist_video_hot", group["hot"].to_numpy()[vid], pa.int32()),
        ("hist_video_ts", v_ts, pa.int64()),
    ):
        offsets, flat = gather_ranges(values, start, end)
        out[name] = list_array(offsets, flat, value_type)

    cmt = kind == KIND_COMMENT_EVENT
    c_ts = ts[cmt]
    applied = np.searchsorted(c_ts, query_ts, side="left")  # [n_query]
    unique_applied, snapshot_of = np.unique(applied, return_inverse=True)
    snap_off, snap_video, snap_comments, snap_ts = _comment_snapshots(
        video_idx[cmt], group["comment_idx"].to_numpy()[cmt], c_ts, unique_applied, max_history
    )
    rec_start, rec_end = snap_off[:-1][snapshot_of], snap_off[1:][snapshot_of]
    for name, values, value_type, width in (
        ("hist_cmt_video", snap_video, pa.int32(), 1),
        ("hist_cmt_comments", snap_comments, pa.int32(), COMMENTS_PER_RECORD),
        ("hist_cmt_ts", snap_ts, pa.int64(), 1),
    ):
        offsets, flat = gather_ranges(values, rec_start * width, rec_end * width)
        out[name] = list_array(offsets, flat, value_type)
    assert all(len(a) == n_query for a in out.values())
    return out


def _splits(group: pa.Table, empty: np.ndarray, split: str, valid_ts: int, test_ts: int) -> np.ndarray:
    """The split of each of user_rows' n + 1 rows (user_rows says which), given which have both histories
    `empty` [n + 1]; "" for the user row."""
    n = len(group)
    kind, ts = group["kind"].to_numpy(), group["ts"].to_numpy()
    split_of = np.full(n + 1, "", dtype=object)
    unrankable = ~group["rankable"].to_numpy(zero_copy_only=False)
    split_of[np.flatnonzero(unrankable)] = "unrankable"
    kept = {k: np.flatnonzero((kind == k) & ~unrankable & ~empty[:n]) for k in (KIND_VIDEO_EVENT, KIND_COMMENT_EVENT)}
    if split == "leave_last_out":
        valid_ts, test_ts = leave_last_out_cuts([ts[rows] for rows in kept.values()])  # rows in (ts, event_id) order
    for task_kind, rows in kept.items():
        split_of[rows] = global_time_splits(ts[rows], valid_ts, test_ts)
        split_of[np.flatnonzero((kind == task_kind) & ~unrankable & empty[:n])] = "dropped"
    return split_of


def without_user_positives(group: pa.Table) -> tuple[pa.ListArray, pa.ListArray]:
    """(negatives, negative_likes) of one user's rows (sorted by time) with the user's earlier positives on the
    same video taken out of each comment example's candidates (a comment the user already liked, replied to
    or wrote, at or before the example's time, is not a negative); the target stays. Later positives are left
    to the readers (trainers/data.py without_later_positives): an example written by an incremental build
    must not change when later events arrive."""
    kind, video = group["kind"].to_numpy(), group["video_idx"].to_numpy()
    comment, ts = group["comment_idx"].to_numpy(), group["ts"].to_numpy()
    is_comment = kind == KIND_COMMENT_EVENT
    negatives, likes = group["negatives"].to_pylist(), group["negative_likes"].to_pylist()
    for i in np.flatnonzero(is_comment).tolist():
        if not negatives[i]:
            continue
        earlier = is_comment & (video == video[i]) & (ts <= ts[i]) & (comment != comment[i])
        others = set(comment[earlier].tolist())
        if others and not others.isdisjoint(negatives[i]):
            keep = [j for j, c in enumerate(negatives[i]) if c not in others]
            negatives[i] = [negatives[i][j] for j in keep]
            likes[i] = [likes[i][j] for j in keep]
    int_list = pa.list_(pa.int32())
    return pa.array(negatives, int_list), pa.array(likes, int_list)


def user_rows(
    group: pa.Table, max_history: int, split: str = "leave_last_out", valid_ts: int = 0, test_ts: int = 0,
    emit_after_ts: int | None = None,
) -> pa.Table:
    """Stage B, one user's annotated positive events -> examples of both tasks plus one "user" row.

    Examples whose two histories are both empty are marked split="dropped", comment events that are not
    rankable (their comment was not published before them) split="unrankable". With "global_time" the split
    of a kept example is its side of the cuts valid_ts / test_ts (global_time_splits); with "leave_last_out"
    the cuts are the user's own (leave_last_out_cuts: one pair for both tasks, so nothing of the user after
    a test event trains). Comment candidates exclude the user's earlier positives on that video
    (without_user_positives). The user row holds the histories as of the end of the group (the build's cut).
    With emit_after_ts, only examples with ts > emit_after_ts come out (an incremental build: older ones were
    written before), plus the user row.
    """
    if split not in SPLIT_POLICIES:
        raise ValueError(f"unknown split policy {split!r}; expected one of {SPLIT_POLICIES}")
    group = sort_by_time(group.cast(ANNOTATED_SCHEMA))
    n = len(group)
    kind = group["kind"].to_numpy()
    query_ts = np.concatenate([group["ts"].to_numpy(), [np.iinfo(np.int64).max]])  # [n + 1], last: the end
    hist = user_histories(group, query_ts, max_history)
    lengths = [pc.list_value_length(hist[c]).to_numpy(zero_copy_only=False) for c in ("hist_video", "hist_cmt_video")]
    split_of = _splits(group, (lengths[0] == 0) & (lengths[1] == 0), split, valid_ts, test_ts)
    negatives, negative_likes = without_user_positives(group)

    is_video = kind == KIND_VIDEO_EVENT
    row_kind = np.where(is_video, "video", "comment").astype(object)
    user_id = group["user_id"][0].as_py() if n else None
    empty_list = pa.array([[]], pa.list_(pa.int32()))
    table = pa.table({
        "row_kind": pa.array(np.append(row_kind, "user"), pa.string()),
        "split": pa.array(split_of, pa.string()),
        "user_id": pa.array([user_id] * (n + 1), pa.string()),
        "event_id": pa.concat_arrays([group["event_id"].combine_chunks(), pa.nulls(1, pa.string())]),
        "ts": pa.array(np.append(group["ts"].to_numpy(), group["ts"].to_numpy().max(initial=0)), pa.int64()),
        "target": pa.array(np.append(np.where(is_video, group["video_idx"].to_numpy(),
                                               group["comment_idx"].to_numpy()), -1).astype(np.int32)),
        "query_video": pa.array(np.append(np.where(is_video, -1, group["video_idx"].to_numpy()), -1).astype(np.int32)),
        **hist,
        "negatives": pa.concat_arrays([negatives, empty_list]),
        "target_likes": pa.array(np.append(group["target_likes"].to_numpy(), 0).astype(np.int32)),
        "negative_likes": pa.concat_arrays([negative_likes, empty_list]),
    }, schema=USER_ROWS_SCHEMA)
    if emit_after_ts is not None:
        keep = np.append(group["ts"].to_numpy() > emit_after_ts, True)
        table = table.filter(pa.array(keep))
    return table


def global_cuts(ts: np.ndarray, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """(valid_ts, test_ts) such that about the last test_frac of the times are test and the valid_frac
    before them valid: the times at those quantiles of `ts` (sorted copy; ties fall on the later side)."""
    ts = np.sort(np.asarray(ts, np.int64))
    if len(ts) == 0:
        return 0, 0
    n = len(ts)

    def cut(frac: float) -> int:
        at = int(np.floor(n * (1.0 - frac)))
        return int(ts[at]) if at < n else int(ts[-1]) + 1  # a zero fraction: nothing at or after the cut

    return cut(valid_frac + test_frac), cut(test_frac)


def select_rows(batch: pa.Table, row_kind: str, split: str | None = None) -> pa.Table:
    """Rows of one kind (and split) from stage B's output, with exactly the columns of the written file."""
    mask = pc.equal(batch["row_kind"], row_kind)
    if split is not None:
        mask = pc.and_(mask, pc.equal(batch["split"], split))
    schema = EXAMPLE_SCHEMA[row_kind]
    out = batch.filter(mask).select(schema.names)
    return out if out.schema.equals(schema) else out.cast(schema)
