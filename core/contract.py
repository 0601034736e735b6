"""The data contract between the stages (docs/DATA.md section 3): tasks, splits, history fields, example
schemas and the features folder's layout. Every module and test reads these names from here.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

TASKS = ("video", "comment")
SPLITS = ("train", "valid", "test")

# A comment-section record of the comment history holds up to this many comments the user interacted with.
COMMENTS_PER_RECORD = 3

# History columns, the same in both tasks and in users.parquet: oldest first, newest last.
HISTORY_FIELDS = [
    ("hist_video", pa.list_(pa.int32())),  # video_idx of the positive video interactions
    ("hist_video_hot", pa.list_(pa.int32())),  # that video's hot comment then, -1 when none
    ("hist_video_ts", pa.list_(pa.int64())),
    ("hist_cmt_video", pa.list_(pa.int32())),  # video_idx of each comment-section record
    ("hist_cmt_comments", pa.list_(pa.int32())),  # COMMENTS_PER_RECORD comment_idx per record, -1 padding
    ("hist_cmt_ts", pa.list_(pa.int64())),
]
HISTORY_COLUMNS = tuple(name for name, _ in HISTORY_FIELDS)

# Video-task candidate protocols: where the negatives of an example at ts come from. Only videos published
# strictly before ts, never the target.
#   uniform_all: uniform over every such video;
#   alive_window: uniform over those alive at ts, published in [ts - W_t, ts) (features/negatives.alive_bounds);
#   popularity_at_t: in proportion to their positive video interactions strictly before ts.
VIDEO_PROTOCOLS = ("uniform_all", "alive_window", "popularity_at_t")
PROTOCOL_COLUMNS = tuple(f"negatives_{p}" for p in VIDEO_PROTOCOLS)

VIDEO_EXAMPLE_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("event_id", pa.string()), ("ts", pa.int64()), ("target", pa.int32()),
    *HISTORY_FIELDS,
    ("negatives", pa.list_(pa.int32())),
    *[(name, pa.list_(pa.int32())) for name in PROTOCOL_COLUMNS],
])
COMMENT_EXAMPLE_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("event_id", pa.string()), ("ts", pa.int64()), ("query_video", pa.int32()),
    ("target", pa.int32()),
    *HISTORY_FIELDS,
    ("negatives", pa.list_(pa.int32())), ("target_likes", pa.int32()), ("negative_likes", pa.list_(pa.int32())),
])
USERS_SCHEMA = pa.schema([("user_id", pa.string()), *HISTORY_FIELDS])
EXAMPLE_SCHEMA = {"video": VIDEO_EXAMPLE_SCHEMA, "comment": COMMENT_EXAMPLE_SCHEMA, "user": USERS_SCHEMA}

# The features folder's files.
VIDEOS = "videos.parquet"  # video_idx = row number, video_id, title, tags, author_id, ts, text
COMMENTS = "comments.parquet"  # comment_idx = row number, comment_id, video_id, video_idx, ..., ts
VIDEO_EMB = "video_emb.npy"  # float32 [V, D], row = video_idx
COMMENT_EMB = "comment_emb.npy"  # float32 [C, D], row = comment_idx
VIDEO_EMB_TABLE = "video_emb.parquet"  # the same vectors with idx, id, content_hash
COMMENT_EMB_TABLE = "comment_emb.parquet"
USERS = "users.parquet"  # each user's histories as of the build's cut
MANIFEST = "manifest.json"  # written last: the marker of a complete folder
EXAMPLES = "examples"  # examples/<task>/<split>/*.parquet
TOP_LEVEL_FILES = (VIDEOS, COMMENTS, VIDEO_EMB, COMMENT_EMB, VIDEO_EMB_TABLE, COMMENT_EMB_TABLE, USERS, MANIFEST)


def check_task_split(task: str, split: str) -> None:
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}")


def examples_dir(root: str | Path, task: str, split: str) -> Path:
    """root/examples/<task>/<split> (whether or not it exists)."""
    check_task_split(task, split)
    return Path(root) / EXAMPLES / task / split
