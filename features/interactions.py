"""Events -> one interaction table keyed by video_idx, the input of stage A: positive video events, positive
comment events and likes, and one row per comment publication (a comment exists from its ts on). Events whose
item is not in the catalog are marked in `status` and counted, not used. Pure functions on Arrow tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.arrays import require_columns
from ingestion.schema import ARROW_SCHEMA

# Row kinds of the interaction table.
KIND_VIDEO_EVENT = 0
KIND_COMMENT_EVENT = 1
KIND_PUBLICATION = 2

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
    batch = require_columns(batch, ARROW_SCHEMA["video_events"], "video_events")
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
    batch = require_columns(batch, ARROW_SCHEMA["comment_events"], "comment_events")
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
