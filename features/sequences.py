"""Point-in-time feature logic (DESIGN.md section 5, docs/DATA.md section 3): start here. Every stage is a pure
function on Arrow tables in a module of its own; `build_local` below chains them in one process, and
`features/build.py` runs the same functions over partitions with Ray Data.

1. Catalog (`features/catalog.py`): `index_videos` / `index_comments` sort the catalogs by (ts, id) so that an
   item's dense index is stable and "published before t" is a prefix of the index range.
2. Events -> one interaction table keyed by video_idx (`features/interactions.py`: `video_event_rows`,
   `comment_event_rows`, `publication_rows`). Events whose item is not in the catalog are marked and counted,
   not used.
3. Stage A, per video (`features/stage_a.py`, `annotate_video_group`): hot comment as of each video event;
   candidate comments and like counts as of each comment event.
4. Stage B, per user (`features/stage_b.py`, `user_rows`): both histories as of each example, the split, and
   the user's histories as of the end of the log.
5. Video negatives (`features/negatives.py`, `add_video_negatives`): video-task negatives, per example, under
   each candidate protocol (VIDEO_PROTOCOLS): `negatives` holds the configured one, `negatives_<protocol>`
   every one.

Shared helpers (seeded sampling, list columns) are in `features/arrays.py`.

Time rule everywhere: only what happened strictly before an example's ts is visible to it; events with the
same ts as the example are not in its history. Equal timestamps are ordered by event_id.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from core.contract import SPLITS, TASKS
from features.arrays import concat_or_empty, group_slices
from features.catalog import index_comments, index_videos
from features.interactions import KIND_VIDEO_EVENT, comment_event_rows, publication_rows, video_event_rows
from features.negatives import add_video_negatives
from features.stage_a import ANNOTATED_SCHEMA, annotate_video_group
from features.stage_b import USER_ROWS_SCHEMA, select_rows, user_rows
from ingestion.schema import POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS


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
    watermark is cut_ts. `window_ms` is W of the alive_window protocol; 0: each event's own window
    (negatives.alive_bounds), as in the Ray build. Returns {"videos", "comments", "rows" (stage B
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
    annotated = concat_or_empty([annotate_video_group(g, num_negatives, seed)
                                 for g in group_slices(interactions, "video_idx")], ANNOTATED_SCHEMA)
    rows = concat_or_empty([user_rows(g, max_history, split, valid_ts, test_ts)
                            for g in group_slices(annotated, "user_id")], USER_ROWS_SCHEMA)
    video_rows = rows.filter(pc.equal(rows["row_kind"], "video"))
    positive = annotated.filter(pc.equal(annotated["kind"], KIND_VIDEO_EVENT))
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
