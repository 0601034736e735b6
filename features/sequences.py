"""Point-in-time feature logic (DESIGN.md section 5, docs/DATA.md section 3) as pure functions on Arrow tables.

Nothing here imports Ray: `features/build.py` wires these functions into Ray Data
(`map_batches`, `groupby(...).map_groups`), and the tests call them directly.

The pipeline, by stage:

1. Catalog: `index_videos` / `index_comments` sort the catalogs by (ts, id) so that an item's dense index is
   stable and "published before t" is a prefix of the index range.
2. Events -> one interaction table (`video_event_rows`, `comment_event_rows`, `publication_rows`), keyed by
   video_idx. Events whose item is not in the catalog are marked and counted, not used.
3. Stage A, per video (`annotate_video_group`): hot comment as of each video event; candidate comments and
   like counts as of each comment event.
4. Stage B, per user (`user_rows`): both histories as of each example, the leave-last-out split, and the
   user's histories as of the end of the log.
5. `add_video_negatives`: video-task negatives, per example, under each candidate protocol
   (VIDEO_PROTOCOLS): `negatives` holds the configured one, `negatives_<protocol>` every one.

Time rule everywhere: only what happened strictly before an example's ts is visible to it; events with the
same ts as the example are not in its history. Equal timestamps are ordered by event_id.
"""

from __future__ import annotations

import hashlib
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.contract import COMMENTS_PER_RECORD, EXAMPLE_SCHEMA, HISTORY_FIELDS, SPLITS, TASKS, VIDEO_PROTOCOLS
from ingestion.schema import ARROW_SCHEMA, POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS

# The event-log tables (docs/DATA.md section 2), as the ingestion stage writes them.
EVENTLOG_SCHEMA = ARROW_SCHEMA

# Row kinds of the interaction table.
KIND_VIDEO_EVENT = 0
KIND_COMMENT_EVENT = 1
KIND_PUBLICATION = 2

# Interaction table: input of stage A (grouped by video_idx). `status` says why a row is not used.
INTERACTION_SCHEMA = pa.schema([
    ("kind", pa.int8()),
    ("event_id", pa.string()),  # null for publications
    ("user_id", pa.string()),  # null for publications
    ("video_idx", pa.int32()),
    ("comment_idx", pa.int32()),  # -1 for video events
    ("ts", pa.int64()),
    ("positive", pa.bool_()),  # a positive interaction: history element and example
    ("like", pa.bool_()),  # a comment "like": counts toward the comment's popularity
    ("status", pa.string()),  # "ok", "not_used", "unknown_video", "unknown_comment"
])

# Stage A output, input of stage B (grouped by user_id): positive events only.
ANNOTATED_SCHEMA = pa.schema([
    ("kind", pa.int8()),
    ("event_id", pa.string()),
    ("user_id", pa.string()),
    ("video_idx", pa.int32()),
    ("comment_idx", pa.int32()),
    ("ts", pa.int64()),
    ("hot", pa.int32()),  # video events: hot comment of the video as of ts, -1 when none
    ("negatives", pa.list_(pa.int32())),  # comment events: other comments under the video published before ts
    ("target_likes", pa.int32()),
    ("negative_likes", pa.list_(pa.int32())),
    # Comment events: the target was published strictly before ts, like its candidates. A comment the user
    # writes at ts did not exist when the section was shown: a history element, never a ranking example.
    ("rankable", pa.bool_()),
])

# Stage B output: video examples, comment examples and one "user" row per user, in one table so that one
# Ray Data pass produces all of them. `split` is train/valid/test, "dropped" (both histories empty),
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


# ---------------------------------------------------------------------------------------------- helpers


def stable_seed(seed: int, salt: str, key: str) -> int:
    """A 64-bit seed from (seed, salt, key) that is the same in every process (Python's hash() is not)."""
    digest = hashlib.blake2b(f"{seed}\x1f{salt}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_excluding(rng: np.random.Generator, lo: int, hi: int, exclude: int, k: int) -> np.ndarray:
    """Up to k distinct ints from [lo, hi) other than `exclude`, sorted; all of them when fewer than k."""
    excluded = lo <= exclude < hi
    n = max(hi - lo - int(excluded), 0)
    picks = np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))
    values = lo + picks
    if excluded:
        # Close the gap left by `exclude`: positions at or after it move up by one.
        values = values + (values >= exclude)
    return values.astype(np.int32)


def gather_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values[starts[i]:ends[i]] for every i, as (offsets [n+1] int32, flat values): a list column's parts."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Element j of row i sits at flat position offsets[i] + j and comes from values[starts[i] + j].
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    return offsets.astype(np.int32), values[index]


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def list_column(rows: list, value_type: pa.DataType) -> pa.ListArray:
    return pa.array(rows, pa.list_(value_type))


def sort_by_time(table: pa.Table, tiebreak: str = "event_id") -> pa.Table:
    return table.take(pc.sort_indices(table, [("ts", "ascending"), (tiebreak, "ascending")]))


def _require_columns(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; expected {schema.names}")
    return table.select(schema.names).cast(schema)


def _require_unique(ids: pa.ChunkedArray, what: str) -> None:
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:5]
        raise ValueError(f"{what}: ids must be unique in the event log, found duplicates such as {dup}")


# ---------------------------------------------------------------------------------------------- catalog


def video_text(title: str | None, tags: list[str] | None) -> str:
    """The string that is embedded for a video: its title, then its tags."""
    return " ".join([title or "", *(t for t in (tags or []) if t)]).strip()


def index_videos(videos: pa.Table) -> pa.Table:
    """videos.parquet: sorted by (ts, video_id), video_idx = row number, plus the embedded `text`."""
    videos = _require_columns(videos, EVENTLOG_SCHEMA["videos"], "videos")
    _require_unique(videos["video_id"], "videos")
    videos = sort_by_time(videos, "video_id")
    text = [video_text(t, g) for t, g in zip(videos["title"].to_pylist(), videos["tags"].to_pylist())]
    idx = pa.array(np.arange(len(videos), dtype=np.int32))
    return videos.add_column(0, "video_idx", idx).append_column("text", pa.array(text, pa.string()))


def index_comments(comments: pa.Table, videos: pa.Table) -> tuple[pa.Table, int]:
    """comments.parquet: comments under a known video, sorted by (ts, comment_id), comment_idx = row number.

    Returns the table and how many comments were left out because their video is not in the catalog.
    """
    comments = _require_columns(comments, EVENTLOG_SCHEMA["comments"], "comments")
    _require_unique(comments["comment_id"], "comments")
    video_idx = pc.index_in(comments["video_id"], value_set=videos["video_id"])
    known = pc.is_valid(video_idx)
    dropped = len(comments) - pc.sum(known).as_py() if len(comments) else 0
    comments = comments.append_column("video_idx", video_idx.cast(pa.int32())).filter(known)
    comments = sort_by_time(comments, "comment_id")
    idx = pa.array(np.arange(len(comments), dtype=np.int32))
    cols = ["comment_id", "video_id", "video_idx", "author_id", "text", "parent_id", "ts"]
    return comments.select(cols).add_column(0, "comment_idx", idx), int(dropped)


# ---------------------------------------------------------------------------------------------- interactions


def _interaction_table(kind, event_id, user_id, video_idx, comment_idx, ts, positive, like, status) -> pa.Table:
    n = len(ts)
    return pa.table({
        "kind": pa.array(np.full(n, kind, np.int8)),
        "event_id": event_id,
        "user_id": user_id,
        "video_idx": pa.array(np.asarray(video_idx, np.int32)),
        "comment_idx": pa.array(np.asarray(comment_idx, np.int32)),
        "ts": ts,
        "positive": pa.array(np.asarray(positive, bool)),
        "like": pa.array(np.asarray(like, bool)),
        "status": pa.array(np.asarray(status, dtype=object), pa.string()),
    }, schema=INTERACTION_SCHEMA)


def _index_of(ids: pa.ChunkedArray, catalog_ids: pa.Array) -> np.ndarray:
    """Position of each id in catalog_ids (= its dense index), -1 when absent."""
    return np.asarray(pc.fill_null(pc.index_in(ids, value_set=catalog_ids), -1).to_numpy(), np.int32)


def _action_in(actions: pa.ChunkedArray, allowed: list[str]) -> np.ndarray:
    mask = pc.is_in(actions, value_set=pa.array(list(allowed), pa.string()))
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), bool)


def video_event_rows(batch: pa.Table, video_ids: pa.Array, positive_actions: list[str]) -> pa.Table:
    """Video events -> interaction rows. Only positive events are used; status says why others are not.

    `video_ids` is videos.parquet's video_id column: its position is the video_idx.
    """
    batch = _require_columns(batch, EVENTLOG_SCHEMA["video_events"], "video_events")
    n = len(batch)
    video_idx = _index_of(batch["video_id"], video_ids)
    positive = _action_in(batch["action"], positive_actions)
    status = np.where(~positive, "not_used", np.where(video_idx >= 0, "ok", "unknown_video"))
    return _interaction_table(
        KIND_VIDEO_EVENT, batch["event_id"], batch["user_id"], video_idx, np.full(n, -1), batch["ts"],
        positive, np.zeros(n, bool), status,
    )


def comment_event_rows(
    batch: pa.Table, comment_ids: pa.Array, comment_video_idx: np.ndarray, positive_actions: list[str]
) -> pa.Table:
    """Comment events -> interaction rows. Positive events and likes are used (likes make hot comments).

    `comment_ids` / `comment_video_idx` are comments.parquet's comment_id and video_idx columns. The video
    of a comment event is the catalog's video of its comment (a comment lives under exactly one video).
    """
    batch = _require_columns(batch, EVENTLOG_SCHEMA["comment_events"], "comment_events")
    comment_idx = _index_of(batch["comment_id"], comment_ids)
    known = comment_idx >= 0
    video_idx = np.full(len(batch), -1, np.int32)
    video_idx[known] = np.asarray(comment_video_idx, np.int32)[comment_idx[known]]
    positive = _action_in(batch["action"], positive_actions)
    like = _action_in(batch["action"], ["like"])
    status = np.where(~(positive | like), "not_used", np.where(known, "ok", "unknown_comment"))
    return _interaction_table(
        KIND_COMMENT_EVENT, batch["event_id"], batch["user_id"], video_idx, comment_idx, batch["ts"],
        positive, like, status,
    )


def publication_rows(comments: pa.Table) -> pa.Table:
    """One interaction row per comment of comments.parquet: the comment exists from its ts on."""
    n = len(comments)
    nulls = pa.nulls(n, pa.string())
    return _interaction_table(
        KIND_PUBLICATION, nulls, nulls, comments["video_idx"].to_numpy(), comments["comment_idx"].to_numpy(),
        comments["ts"], np.zeros(n, bool), np.zeros(n, bool), np.full(n, "ok", dtype=object),
    )


# ---------------------------------------------------------------------------------------------- stage A


def annotate_video_group(group: pa.Table, num_negatives: int, seed: int) -> pa.Table:
    """Stage A, one video's interaction rows -> its positive events, annotated as of each event's ts.

    - video event: `hot` = the comment with the most likes strictly before ts among the video's comments
      published strictly before ts (ties: earlier published, then smaller comment_idx; both mean smaller
      comment_idx), -1 when there is none;
    - comment event: `negatives` = up to num_negatives other comments of the video published strictly before
      ts (a sample fixed by (seed, event_id) when there are more), `target_likes` / `negative_likes` = likes
      received strictly before ts.

    One sweep in time order keeps like counts and the running best comment; at equal ts the queries come
    before the likes, so a like is never visible at its own ts.
    """
    kind = group["kind"].to_numpy()
    comment_idx = group["comment_idx"].to_numpy()
    ts = group["ts"].to_numpy()
    like = group["like"].to_numpy(zero_copy_only=False)
    positive = group["positive"].to_numpy(zero_copy_only=False)

    # The video's comments in publication order: local position = rank of comment_idx (sorted by (ts, id)).
    pub = kind == KIND_PUBLICATION
    order = np.argsort(comment_idx[pub], kind="stable")
    pub_idx = comment_idx[pub][order].astype(np.int32)  # [C]
    pub_ts = ts[pub][order]  # [C], non-decreasing
    n_comments = len(pub_idx)

    query = (kind == KIND_VIDEO_EVENT) | ((kind == KIND_COMMENT_EVENT) & positive)
    rows = np.flatnonzero(query)  # [Q]
    n_eligible = np.searchsorted(pub_ts, ts[rows], side="left")  # [Q] comments published strictly before ts
    likes = np.flatnonzero((kind == KIND_COMMENT_EVENT) & like)  # [L]
    like_local = np.searchsorted(pub_idx, comment_idx[likes])  # [L]

    # Sweep: step type 0 = query (row in `rows`), 1 = like; sorted by (ts, type).
    step_ts = np.concatenate([ts[rows], ts[likes]])
    step_type = np.concatenate([np.zeros(len(rows), np.int8), np.ones(len(likes), np.int8)])
    step_ref = np.concatenate([np.arange(len(rows)), like_local])
    steps = np.lexsort((step_type, step_ts))

    n_rows = len(rows)
    hot = np.full(n_rows, -1, np.int32)
    target_likes = np.zeros(n_rows, np.int32)
    rankable = np.ones(n_rows, bool)
    negatives: list[list[int]] = [[] for _ in range(n_rows)]
    negative_likes: list[list[int]] = [[] for _ in range(n_rows)]
    event_ids = group["event_id"].to_pylist()
    is_video_event = (kind[rows] == KIND_VIDEO_EVENT).tolist()
    target_local = np.searchsorted(pub_idx, comment_idx[rows]).tolist() if n_comments else [0] * n_rows
    counts = [0] * n_comments  # likes so far, per local comment
    prefix = 0  # comments [0, prefix) are published as of the sweep's time
    best, best_count = -1, -1  # running argmax over the prefix, ties to the smaller local index
    for s in steps.tolist():
        ref = int(step_ref[s])
        if step_type[s] == 1:
            counts[ref] += 1
            if ref < prefix and (counts[ref] > best_count or (counts[ref] == best_count and ref < best)):
                best, best_count = ref, counts[ref]
            continue
        for c in range(prefix, int(n_eligible[ref])):
            if counts[c] > best_count:
                best, best_count = c, counts[c]
        prefix = max(prefix, int(n_eligible[ref]))
        if is_video_event[ref]:
            hot[ref] = pub_idx[best] if prefix else -1
            continue
        target = target_local[ref]
        rankable[ref] = target < prefix
        target_likes[ref] = counts[target]
        rng = np.random.default_rng(stable_seed(seed, "comment", event_ids[rows[ref]]))
        local = sample_excluding(rng, 0, prefix, target, num_negatives).tolist()
        negatives[ref] = pub_idx[local].tolist()
        negative_likes[ref] = [counts[c] for c in local]

    out = group.take(pa.array(rows, pa.int64()))
    return pa.table({
        "kind": out["kind"], "event_id": out["event_id"], "user_id": out["user_id"],
        "video_idx": out["video_idx"], "comment_idx": out["comment_idx"], "ts": out["ts"],
        "hot": pa.array(hot), "negatives": list_column(negatives, pa.int32()),
        "target_likes": pa.array(target_likes),
        "negative_likes": list_column(negative_likes, pa.int32()), "rankable": pa.array(rankable),
    }, schema=ANNOTATED_SCHEMA)


# ---------------------------------------------------------------------------------------------- stage B


def assign_splits(n: int) -> list[str]:
    """Leave-last-out split of one user's n examples of one task, oldest first."""
    if n >= 3:
        return ["train"] * (n - 2) + ["valid", "test"]
    if n == 2:
        return ["train", "test"]
    return ["train"] * n


SPLIT_POLICIES = ("leave_last_out", "global_time")


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


def user_rows(
    group: pa.Table, max_history: int, split: str = "leave_last_out", valid_ts: int = 0, test_ts: int = 0,
    emit_after_ts: int | None = None,
) -> pa.Table:
    """Stage B, one user's annotated positive events -> examples of both tasks plus one "user" row.

    Examples whose two histories are both empty are marked split="dropped", comment events that are not
    rankable (their comment was not published before them) split="unrankable". With split="leave_last_out" the
    split is assigned after that, over the kept examples in (ts, event_id) order, so every user with at least
    two kept examples of a task gets a test example of that task; with "global_time" it is the example's
    side of the cuts valid_ts / test_ts (global_time_splits). The user row holds the histories as of the end
    of the group (the build's cut). With emit_after_ts, only examples with ts > emit_after_ts come out (an
    incremental build: older ones were written before), plus the user row.
    """
    if split not in SPLIT_POLICIES:
        raise ValueError(f"unknown split policy {split!r}; expected one of {SPLIT_POLICIES}")
    group = sort_by_time(group.cast(ANNOTATED_SCHEMA))
    n = len(group)
    kind = group["kind"].to_numpy()
    query_ts = np.concatenate([group["ts"].to_numpy(), [np.iinfo(np.int64).max]])  # [n + 1], last: the end
    hist = user_histories(group, query_ts, max_history)

    lengths = [pc.list_value_length(hist[c]).to_numpy(zero_copy_only=False) for c in ("hist_video", "hist_cmt_video")]
    empty = (lengths[0] == 0) & (lengths[1] == 0)
    split_of = np.full(n + 1, "", dtype=object)
    unrankable = ~group["rankable"].to_numpy(zero_copy_only=False)
    split_of[np.flatnonzero(unrankable)] = "unrankable"
    for task_kind in (KIND_VIDEO_EVENT, KIND_COMMENT_EVENT):
        candidates = (kind == task_kind) & ~unrankable
        rows = np.flatnonzero(candidates & ~empty[:n])  # already in (ts, event_id) order
        if split == "leave_last_out":
            split_of[rows] = assign_splits(len(rows))
        else:
            split_of[rows] = global_time_splits(group["ts"].to_numpy()[rows], valid_ts, test_ts)
        split_of[np.flatnonzero(candidates & empty[:n])] = "dropped"
    split = split_of

    is_video = kind == KIND_VIDEO_EVENT
    row_kind = np.where(is_video, "video", "comment").astype(object)
    user_id = group["user_id"][0].as_py() if n else None
    empty_list = pa.array([[]], pa.list_(pa.int32()))
    table = pa.table({
        "row_kind": pa.array(np.append(row_kind, "user"), pa.string()),
        "split": pa.array(split, pa.string()),
        "user_id": pa.array([user_id] * (n + 1), pa.string()),
        "event_id": pa.concat_arrays([group["event_id"].combine_chunks(), pa.nulls(1, pa.string())]),
        "ts": pa.array(np.append(group["ts"].to_numpy(), group["ts"].to_numpy().max(initial=0)), pa.int64()),
        "target": pa.array(np.append(np.where(is_video, group["video_idx"].to_numpy(),
                                               group["comment_idx"].to_numpy()), -1).astype(np.int32)),
        "query_video": pa.array(np.append(np.where(is_video, -1, group["video_idx"].to_numpy()), -1).astype(np.int32)),
        **hist,
        "negatives": pa.concat_arrays([group["negatives"].combine_chunks(), empty_list]),
        "target_likes": pa.array(np.append(group["target_likes"].to_numpy(), 0).astype(np.int32)),
        "negative_likes": pa.concat_arrays([group["negative_likes"].combine_chunks(), empty_list]),
    }, schema=USER_ROWS_SCHEMA)
    if emit_after_ts is not None:
        keep = np.append(group["ts"].to_numpy() > emit_after_ts, True)
        table = table.filter(pa.array(keep))
    return table


# ---------------------------------------------------------------------------------------------- video negatives


def alive_window_ms(video_ts: np.ndarray, event_ts: np.ndarray, num_negatives: int) -> int:
    """The default W of `alive_window`: the smallest window such that every event with at least
    num_negatives + 1 videos published strictly before it has at least num_negatives + 1 of them in
    [ts - W, ts), so num_negatives besides the target. Events with fewer videos before them see all of
    them anyway and do not count. 1 when no event counts.

    For an event with h videos before it (video_ts sorted), the (num_negatives + 1)-th newest is at
    index h - num_negatives - 1: W must reach back to its publication time.
    """
    hi = np.searchsorted(video_ts, event_ts, side="left")  # [E] videos published strictly before
    counted = hi >= num_negatives + 1
    if num_negatives == 0 or not counted.any():
        return 1
    oldest_needed = np.asarray(video_ts)[hi[counted] - num_negatives - 1]
    return int(max(1, (np.asarray(event_ts)[counted] - oldest_needed).max()))


def _sample_weighted(rng: np.random.Generator, weights: np.ndarray, exclude: int, k: int) -> np.ndarray:
    """Up to k distinct indices of `weights` other than `exclude`, drawn without replacement in proportion to
    the weights (exponential keys: the k smallest of Exp(1) / w); zero-weight ones only to fill up to k,
    uniformly. Sorted."""
    n = len(weights)
    keys = rng.exponential(size=n)
    with np.errstate(divide="ignore"):
        keys = np.where(weights > 0, keys / np.maximum(weights, 1e-300), np.inf)
    # Zero-weight items come after every weighted one, in a uniform order among themselves.
    order = np.lexsort((rng.random(n), keys))
    if 0 <= exclude < n:
        order = order[order != exclude]
    return np.sort(order[:k]).astype(np.int32)


def add_video_negatives(
    batch: pa.Table, video_ts: np.ndarray, num_negatives: int, seed: int, window_ms: int = 0,
    protocol: str = "uniform_all", interaction_ts: np.ndarray | None = None,
    interaction_video: np.ndarray | None = None,
) -> pa.Table:
    """Fill the candidate lists of video-task rows under every protocol of VIDEO_PROTOCOLS, each with up to
    num_negatives distinct videos published strictly before ts, never the target (fewer only when fewer such
    videos exist), sampled with a generator seeded by (seed, protocol, event_id); `negatives` is the one of
    `protocol`.

    - uniform_all: uniform over every video published before ts;
    - alive_window: uniform over those published in [ts - window_ms, ts) (window_ms > 0 needed for it to be
      the configured protocol; with 0 its column equals uniform_all's);
    - popularity_at_t: in proportion to the positive interactions (interaction_ts / interaction_video, the
      used positive video events) strictly before ts; videos without any only fill up the list, uniformly.

    `video_ts` is videos.parquet's ts column (non-decreasing, so the eligible videos are an index range).
    """
    if protocol not in VIDEO_PROTOCOLS:
        raise ValueError(f"unknown video protocol {protocol!r}; expected one of {VIDEO_PROTOCOLS}")
    if protocol == "alive_window" and window_ms <= 0:
        raise ValueError("protocol alive_window needs window_ms > 0")
    if interaction_ts is None:
        interaction_ts, interaction_video = np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(interaction_ts, kind="stable")
    inter_ts, inter_video = np.asarray(interaction_ts)[order], np.asarray(interaction_video)[order]

    ts = batch["ts"].to_numpy()
    hi = np.searchsorted(video_ts, ts, side="left")
    lo = np.searchsorted(video_ts, ts - window_ms, side="left") if window_ms > 0 else np.zeros_like(hi)
    targets = batch["target"].to_numpy()
    event_ids = batch["event_id"].to_pylist()
    lists: dict[str, list[np.ndarray]] = {p: [None] * len(batch) for p in VIDEO_PROTOCOLS}
    # Rows in time order, so the interaction counts before ts grow with one pass over the interactions.
    counts = np.zeros(len(video_ts), np.int64)
    seen = 0
    for i in np.argsort(ts, kind="stable").tolist():
        event_id, a, b, target = event_ids[i], int(lo[i]), int(hi[i]), int(targets[i])
        rng = np.random.default_rng(stable_seed(seed, "video", event_id))
        lists["uniform_all"][i] = sample_excluding(rng, 0, b, target, num_negatives)
        rng = np.random.default_rng(stable_seed(seed, "video", event_id))  # same draws: windows agree when equal
        lists["alive_window"][i] = sample_excluding(rng, a, b, target, num_negatives)
        now = int(np.searchsorted(inter_ts, ts[i], side="left"))
        np.add.at(counts, inter_video[seen:now], 1)
        seen = now
        rng = np.random.default_rng(stable_seed(seed, "video/popularity_at_t", event_id))
        lists["popularity_at_t"][i] = _sample_weighted(rng, counts[:b], target, num_negatives)
    for p in VIDEO_PROTOCOLS:
        column = _list_of_arrays(lists[p])
        batch = _set_or_append(batch, f"negatives_{p}", column)
    return _set_or_append(batch, "negatives", batch[f"negatives_{protocol}"])


def _list_of_arrays(rows: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(x) for x in rows], out=offsets[1:])
    flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    return list_array(offsets.astype(np.int32), flat, pa.int32())


def _set_or_append(table: pa.Table, name: str, column) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, column)
    return table.set_column(index, name, column)


def select_rows(batch: pa.Table, row_kind: str, split: str | None = None) -> pa.Table:
    """Rows of one kind (and split) from stage B's output, with exactly the columns of the written file."""
    mask = pc.equal(batch["row_kind"], row_kind)
    if split is not None:
        mask = pc.and_(mask, pc.equal(batch["split"], split))
    schema = EXAMPLE_SCHEMA[row_kind]
    out = batch.filter(mask).select(schema.names)
    return out if out.schema.equals(schema) else out.cast(schema)


# ---------------------------------------------------------------------------------------------- one process


def group_slices(table: pa.Table, key: str) -> list[pa.Table]:
    """The rows of each distinct `key`, one table per key (what Ray's groupby hands to map_groups)."""
    if len(table) == 0:
        return []
    table = table.take(pc.sort_indices(table, [(key, "ascending")]))
    keys = table[key].to_numpy(zero_copy_only=False)
    bounds = [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist(), len(table)]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


def build_local(
    videos: pa.Table,
    comments: pa.Table,
    video_events: pa.Table,
    comment_events: pa.Table,
    *,
    max_history: int = 50,
    num_negatives: int = 99,
    seed: int = 0,
    window_ms: int = 0,
    protocol: str = "alive_window",
    positive_video_actions: tuple[str, ...] = tuple(sorted(POSITIVE_VIDEO_ACTIONS)),
    positive_comment_actions: tuple[str, ...] = tuple(sorted(POSITIVE_COMMENT_ACTIONS)),
    split: str = "leave_last_out",
    valid_ts: int = 0,
    test_ts: int = 0,
    cut_ts: int | None = None,
) -> dict[str, pa.Table]:
    """The whole feature pipeline in one process on in-memory tables: the reference the Ray build must match
    (and the single-process baseline of the features benchmark).

    `cut_ts`: only events (and comment publications) at or before it are used, as in a build whose
    watermark is cut_ts. `window_ms` is W of the alive_window protocol; 0: the automatic one (alive_window_ms
    over the used positive video events), as in the Ray build. Returns {"videos", "comments", "rows" (stage B
    output, with negatives), "users", "video/<split>", "comment/<split>"}.
    """
    videos = index_videos(videos)
    comments, _ = index_comments(comments, videos)
    events = pa.concat_tables([
        video_event_rows(video_events, videos["video_id"].combine_chunks(), list(positive_video_actions)),
        comment_event_rows(comment_events, comments["comment_id"].combine_chunks(),
                           comments["video_idx"].to_numpy(), list(positive_comment_actions)),
    ])
    interactions = pa.concat_tables([events.filter(pc.equal(events["status"], "ok")), publication_rows(comments)])
    if cut_ts is not None:
        interactions = interactions.filter(pc.less_equal(interactions["ts"], cut_ts))
    annotated = _concat([annotate_video_group(g, num_negatives, seed) for g in group_slices(interactions, "video_idx")],
                        ANNOTATED_SCHEMA)
    rows = _concat([user_rows(g, max_history, split, valid_ts, test_ts) for g in group_slices(annotated, "user_id")],
                   USER_ROWS_SCHEMA)
    video_rows = rows.filter(pc.equal(rows["row_kind"], "video"))
    positive = annotated.filter(pc.equal(annotated["kind"], KIND_VIDEO_EVENT))
    if window_ms == 0:  # the automatic W, also for the alive_window column under another protocol
        window_ms = alive_window_ms(videos["ts"].to_numpy(), positive["ts"].to_numpy(), num_negatives)
    rows = pa.concat_tables([
        add_video_negatives(video_rows, videos["ts"].to_numpy(), num_negatives, seed, window_ms, protocol,
                            positive["ts"].to_numpy(), positive["video_idx"].to_numpy()),
        rows.filter(pc.not_equal(rows["row_kind"], "video")),
    ], promote_options="default")
    out = {"videos": videos, "comments": comments, "rows": rows, "users": select_rows(rows, "user")}
    for task in TASKS:
        for split in SPLITS:
            out[f"{task}/{split}"] = select_rows(rows, task, split)
    return out


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


def without_candidates(batch: pa.Table) -> pa.Table:
    """Annotated rows as an incremental build keeps them: the history fields only (candidate lists emptied,
    they belong to the example that was already written)."""
    empty = pa.array([[]] * len(batch), pa.list_(pa.int32()))
    batch = batch.cast(ANNOTATED_SCHEMA)
    batch = batch.set_column(batch.schema.get_field_index("negatives"), "negatives", empty)
    return batch.set_column(batch.schema.get_field_index("negative_likes"), "negative_likes", empty)


def unique_values(batch: pa.Table, column: str) -> pa.Table:
    """Distinct values of one column (per batch; the caller merges)."""
    return pa.table({column: pc.unique(batch[column])})


def count_by(batch: pa.Table, keys: list[str]) -> pa.Table:
    """Rows and ts range per distinct keys: partial results that the caller merges (no shuffle needed).

    Single-threaded: Arrow's threaded group-by failed inside Ray Data tasks ("thread index 10 is out of range
    [0, 10)", pyarrow 26, seen under load), and these batches are small."""
    return batch.group_by(keys, use_threads=False).aggregate([("ts", "count"), ("ts", "min"), ("ts", "max")])


def merge_counts(parts: list[dict], keys: list[str]) -> dict[tuple, dict]:
    """Merge count_by rows (as dicts) from many batches: {key tuple: {"count", "ts_min", "ts_max"}}."""
    out: dict[tuple, dict] = {}
    for row in parts:
        key = tuple(row[k].item() if isinstance(row[k], np.generic) else row[k] for k in keys)
        seen = out.setdefault(key, {"count": 0, "ts_min": row["ts_min"], "ts_max": row["ts_max"]})
        seen["count"] += int(row["ts_count"])
        seen["ts_min"] = int(min(seen["ts_min"], row["ts_min"]))
        seen["ts_max"] = int(max(seen["ts_max"], row["ts_max"]))
    return out
