"""Stage A, per video: the hot comment as of each video event, and the candidate comments and like counts as of
each comment event. Input: one video's interaction rows (features/interactions.py); output: its positive
events as ANNOTATED_SCHEMA rows, the input of stage B. Pure functions on Arrow tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from features.arrays import list_column, sample_excluding, stable_seed
from features.interactions import KIND_COMMENT_EVENT, KIND_PUBLICATION, KIND_VIDEO_EVENT

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


def _sweep_steps(query_ts: np.ndarray, like_ts: np.ndarray, like_local: np.ndarray) -> tuple[list, list]:
    """(step type, ref) lists in sweep order, by (ts, type): type 0 = query (ref: its number), 1 = like (ref:
    the liked comment's local position); at an equal ts the queries come first."""
    step_ts = np.concatenate([query_ts, like_ts])
    step_type = np.concatenate([np.zeros(len(query_ts), np.int8), np.ones(len(like_ts), np.int8)])
    step_ref = np.concatenate([np.arange(len(query_ts)), like_local])
    steps = np.lexsort((step_type, step_ts))
    return step_type[steps].tolist(), step_ref[steps].tolist()


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
    positive = group["positive"].to_numpy(zero_copy_only=False)
    like = group["like"].to_numpy(zero_copy_only=False)

    # The video's comments in publication order: local position = rank of comment_idx (sorted by (ts, id)).
    pub = kind == KIND_PUBLICATION
    order = np.argsort(comment_idx[pub], kind="stable")
    pub_idx = comment_idx[pub][order].astype(np.int32)  # [C]
    pub_ts = ts[pub][order]  # [C], non-decreasing

    rows = np.flatnonzero((kind == KIND_VIDEO_EVENT) | ((kind == KIND_COMMENT_EVENT) & positive))  # [Q] queries
    out = group.take(pa.array(rows, pa.int64()))
    n_eligible = np.searchsorted(pub_ts, ts[rows], side="left").tolist()  # [Q] comments published strictly before
    likes = np.flatnonzero((kind == KIND_COMMENT_EVENT) & like)  # [L]
    step_types, step_refs = _sweep_steps(ts[rows], ts[likes], np.searchsorted(pub_idx, comment_idx[likes]))

    n_rows = len(rows)
    hot = np.full(n_rows, -1, np.int32)
    target_likes = np.zeros(n_rows, np.int32)
    rankable = np.ones(n_rows, bool)
    negatives: list[list[int]] = [[] for _ in range(n_rows)]
    negative_likes: list[list[int]] = [[] for _ in range(n_rows)]
    event_ids = out["event_id"].to_pylist()
    is_video_event = (kind[rows] == KIND_VIDEO_EVENT).tolist()
    target_local = np.searchsorted(pub_idx, comment_idx[rows]).tolist() if len(pub_idx) else [0] * n_rows
    counts = [0] * len(pub_idx)  # likes so far, per local comment
    prefix = 0  # comments [0, prefix) are published as of the sweep's time
    best, best_count = -1, -1  # running argmax over the prefix, ties to the smaller local index
    for step_type, ref in zip(step_types, step_refs):
        if step_type == 1:
            counts[ref] += 1
            if ref < prefix and (counts[ref] > best_count or (counts[ref] == best_count and ref < best)):
                best, best_count = ref, counts[ref]
            continue
        for c in range(prefix, n_eligible[ref]):
            if counts[c] > best_count:
                best, best_count = c, counts[c]
        prefix = max(prefix, n_eligible[ref])
        if is_video_event[ref]:
            hot[ref] = pub_idx[best] if prefix else -1
            continue
        target = target_local[ref]
        rankable[ref] = target < prefix
        target_likes[ref] = counts[target]
        rng = np.random.default_rng(stable_seed(seed, "comment", event_ids[ref]))
        local = sample_excluding(rng, 0, prefix, target, num_negatives).tolist()
        negatives[ref] = pub_idx[local].tolist()
        negative_likes[ref] = [counts[c] for c in local]

    return pa.table({
        "kind": out["kind"], "event_id": out["event_id"], "user_id": out["user_id"],
        "video_idx": out["video_idx"], "comment_idx": out["comment_idx"], "ts": out["ts"],
        "hot": pa.array(hot), "negatives": list_column(negatives, pa.int32()),
        "target_likes": pa.array(target_likes),
        "negative_likes": list_column(negative_likes, pa.int32()), "rankable": pa.array(rankable),
    }, schema=ANNOTATED_SCHEMA)


def without_candidates(batch: pa.Table) -> pa.Table:
    """Annotated rows as an incremental build keeps them: the history fields only (candidate lists emptied,
    they belong to the example that was already written)."""
    empty = pa.array([[]] * len(batch), pa.list_(pa.int32()))
    batch = batch.cast(ANNOTATED_SCHEMA)
    batch = batch.set_column(batch.schema.get_field_index("negatives"), "negatives", empty)
    return batch.set_column(batch.schema.get_field_index("negative_likes"), "negative_likes", empty)
