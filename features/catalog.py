"""Catalog indexing: the videos and comments tables sorted by (ts, id), so that an item's dense index (its row
number in videos.parquet / comments.parquet) is stable and "published before t" is a prefix of the index
range. Pure functions on Arrow tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.arrays import require_columns, sort_by_time
from ingestion.schema import ARROW_SCHEMA


def _require_unique(ids: pa.ChunkedArray, what: str) -> None:
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:5]
        raise ValueError(f"{what}: ids must be unique in the event log, found duplicates such as {dup}")


def video_text(title: str | None, tags: list[str] | None) -> str:
    """The string that is embedded for a video: its title, then its tags."""
    return " ".join([title or "", *(t for t in (tags or []) if t)]).strip()


def index_videos(videos: pa.Table) -> pa.Table:
    """videos.parquet: sorted by (ts, video_id), video_idx = row number, plus the embedded `text`."""
    videos = require_columns(videos, ARROW_SCHEMA["videos"], "videos")
    _require_unique(videos["video_id"], "videos")
    videos = sort_by_time(videos, "video_id")
    text = [video_text(t, g) for t, g in zip(videos["title"].to_pylist(), videos["tags"].to_pylist())]
    idx = pa.array(np.arange(len(videos), dtype=np.int32))
    return videos.add_column(0, "video_idx", idx).append_column("text", pa.array(text, pa.string()))


def index_comments(comments: pa.Table, videos: pa.Table) -> tuple[pa.Table, int]:
    """comments.parquet: comments under a known video, sorted by (ts, comment_id), comment_idx = row number.

    Returns the table and how many comments were left out because their video is not in the catalog.
    """
    comments = require_columns(comments, ARROW_SCHEMA["comments"], "comments")
    _require_unique(comments["comment_id"], "comments")
    video_idx = pc.index_in(comments["video_id"], value_set=videos["video_id"])
    known = pc.is_valid(video_idx)
    dropped = len(comments) - pc.sum(known).as_py() if len(comments) else 0
    comments = comments.append_column("video_idx", video_idx.cast(pa.int32())).filter(known)
    comments = sort_by_time(comments, "comment_id")
    idx = pa.array(np.arange(len(comments), dtype=np.int32))
    cols = ["comment_id", "video_id", "video_idx", "author_id", "text", "parent_id", "ts"]
    return comments.select(cols).add_column(0, "comment_idx", idx), int(dropped)
