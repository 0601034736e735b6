"""From the features folder (docs/DATA.md section 3) to model inputs.

`collate` turns a batch of example rows into padded index tensors. Histories are kept newest-last and
right-aligned: padding (-1, mask False) first, the newest element in the last slot, at most `max_history`
elements (the oldest are dropped). Each batch is padded to its own longest history (at least 1 slot), which
the models handle because position ids count back from the newest slot (trainers/models/layers.py).

Text embeddings are not copied into batches: `load_text_tables` memory-maps the .npy matrices once per
process and the models index them on their own device.

A features folder given as a URI (s3://...) is read through a local copy (`local_features`), taken once per
node at each entry point; Ray Data reads its example files through the URI (`examples_source`), so read tasks
may run on any node.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from core import storage
from core.contract import COMMENTS_PER_RECORD, SPLITS, TASKS
from core.paths import cache_dir


def _rows(batch: dict, name: str) -> list[np.ndarray]:
    """One column of list values (numpy object array, 2-D array or list of lists) as int64 arrays."""
    if name not in batch:
        raise ValueError(f"batch has no column {name!r}; it has {sorted(batch)}")
    return [np.asarray(row, dtype=np.int64).reshape(-1) for row in batch[name]]


def _pad_newest(rows: list[np.ndarray], width: int) -> np.ndarray:
    """Right-aligned [B, width] int64, -1 padding, keeping the last `width` values of each row."""
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[len(row) - width:] if len(row) > width else row
        if len(row):
            out[i, width - len(row):] = row
    return out


def _lengths_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """[B] lengths (already capped at width) -> [B, width] bool, True on the last `length` slots."""
    return np.arange(width)[None, :] >= (width - lengths)[:, None]


def collate_histories(batch: dict, max_history: int) -> dict[str, torch.Tensor]:
    """History columns of rows (examples or users.parquet) -> tensors.

    Returns hist_video, hist_video_hot [B, Lv] long, hist_video_mask [B, Lv] bool, hist_cmt_video [B, Lc]
    long, hist_cmt_comments [B, Lc, 3] long, hist_cmt_mask [B, Lc] bool, and the element times
    hist_video_ts [B, Lv] / hist_cmt_ts [B, Lc] long (ms). -1 marks padding (and, in hist_video_hot /
    hist_cmt_comments, "no comment"). Rows with a `ts` column (examples: the event time) also give ts [B]
    long, the request time the time features measure from.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    videos, hots = _rows(batch, "hist_video"), _rows(batch, "hist_video_hot")
    records, comments = _rows(batch, "hist_cmt_video"), _rows(batch, "hist_cmt_comments")
    video_ts, record_ts = _rows(batch, "hist_video_ts"), _rows(batch, "hist_cmt_ts")
    for i, (v, h, r, c, vt, rt) in enumerate(zip(videos, hots, records, comments, video_ts, record_ts)):
        if len(v) != len(h) or len(v) != len(vt):
            raise ValueError(f"row {i}: hist_video has {len(v)} values but hist_video_hot has {len(h)} "
                             f"and hist_video_ts {len(vt)}")
        if len(r) != len(rt):
            raise ValueError(f"row {i}: hist_cmt_video has {len(r)} values but hist_cmt_ts has {len(rt)}")
        if len(c) != COMMENTS_PER_RECORD * len(r):
            raise ValueError(f"row {i}: hist_cmt_comments has {len(c)} values, expected "
                             f"{COMMENTS_PER_RECORD} x {len(r)} records")
    v_len = np.minimum([len(v) for v in videos], max_history).astype(np.int64)
    c_len = np.minimum([len(r) for r in records], max_history).astype(np.int64)
    v_width = max(1, int(v_len.max(initial=0)))
    c_width = max(1, int(c_len.max(initial=0)))
    cmt = _pad_newest(comments, COMMENTS_PER_RECORD * c_width).reshape(len(comments), c_width, COMMENTS_PER_RECORD)
    out = {
        "hist_video": torch.from_numpy(_pad_newest(videos, v_width)),
        "hist_video_hot": torch.from_numpy(_pad_newest(hots, v_width)),
        "hist_video_mask": torch.from_numpy(_lengths_mask(v_len, v_width)),
        "hist_cmt_video": torch.from_numpy(_pad_newest(records, c_width)),
        "hist_cmt_comments": torch.from_numpy(cmt),
        "hist_cmt_mask": torch.from_numpy(_lengths_mask(c_len, c_width)),
        "hist_video_ts": torch.from_numpy(_pad_newest(video_ts, v_width)),
        "hist_cmt_ts": torch.from_numpy(_pad_newest(record_ts, c_width)),
    }
    if "ts" in batch:
        out["ts"] = torch.as_tensor(np.asarray(batch["ts"], dtype=np.int64).reshape(-1))
        if len(out["ts"]) != len(videos):
            raise ValueError(f"ts has {len(out['ts'])} values for {len(videos)} rows")
    return out


def _pad_left(rows: list[np.ndarray], fill: int) -> np.ndarray:
    """Left-aligned [B, max(1, longest)] int64 (candidate lists: order does not matter)."""
    width = max(1, max((len(r) for r in rows), default=0))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate(batch: dict, max_history: int) -> dict[str, torch.Tensor]:
    """Example rows of either task -> tensors: the histories (see collate_histories), target [B] and
    negatives [B, K] long (-1 padding), plus query_video [B] (comment task) and target_likes [B] /
    negative_likes [B, K] (comment task, 0 under padding) when present."""
    out = collate_histories(batch, max_history)
    out["target"] = torch.as_tensor(np.asarray(batch["target"], dtype=np.int64))
    negatives = _rows(batch, "negatives")
    out["negatives"] = torch.from_numpy(_pad_left(negatives, -1))
    if "query_video" in batch:
        out["query_video"] = torch.as_tensor(np.asarray(batch["query_video"], dtype=np.int64))
    if "target_likes" in batch:
        likes = _rows(batch, "negative_likes")
        if any(len(a) != len(b) for a, b in zip(likes, negatives)):
            raise ValueError("negative_likes and negatives differ in length")
        out["target_likes"] = torch.as_tensor(np.asarray(batch["target_likes"], dtype=np.int64))
        out["negative_likes"] = torch.from_numpy(_pad_left(likes, 0))
    return out


@functools.lru_cache(maxsize=4)
def _load_text_tables(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    tables = []
    for name in ("video_emb.npy", "comment_emb.npy"):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} is missing (features folder, docs/DATA.md section 3)")
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.ndim != 2 or array.dtype != np.float32:
            raise ValueError(f"{file}: expected float32 [N, D], got {array.dtype} {array.shape}")
        with warnings.catch_warnings():
            # Read-only memory map: torch warns it is not writable; nothing ever writes to it.
            warnings.simplefilter("ignore", UserWarning)
            tables.append(torch.from_numpy(array))
    if tables[0].shape[1] != tables[1].shape[1]:
        raise ValueError(f"{path}: video and comment embeddings differ in dimension "
                         f"({tables[0].shape[1]} vs {tables[1].shape[1]})")
    return tables[0], tables[1]


def load_text_tables(features_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(video_emb [V, D], comment_emb [C, D]) as CPU tensors over read-only memory maps, loaded once per
    process and folder."""
    return _load_text_tables(os.path.abspath(features_dir))


@functools.lru_cache(maxsize=4)
def _load_item_times(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    times = []
    for name in ("videos.parquet", "comments.parquet"):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} is missing (features folder, docs/DATA.md section 3)")
        column = pq.read_table(file, columns=["ts"])["ts"]
        if column.null_count:
            raise ValueError(f"{file}: {column.null_count} rows have no publication time ts")
        times.append(torch.from_numpy(column.to_numpy().astype(np.int64)))
    return times[0], times[1]


def load_item_times(features_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(video publication ts [V], comment publication ts [C]) in ms, long, row = item index (videos.parquet
    and comments.parquet `ts`), loaded once per process and folder: the reference points of item ages."""
    return _load_item_times(os.path.abspath(features_dir))


def local_features(features: str | Path) -> Path:
    """A local folder with the features folder `features`: the folder itself when it is a path, else a copy
    downloaded once per node into <LSVCR_CACHE_DIR>/features, keyed by the URI and its manifest.json."""
    return Path(os.path.abspath(storage.local_copy(str(features), cache_dir() / "features", "manifest.json")))


def worker_features(local: str, source: str) -> str:
    """In a Ray worker or actor: the driver's local copy `local` when this node has it (the same machine: a
    copy is renamed into place whole and named by the URI and its manifest, so one that is there is the one
    meant), else this node's own copy of `source` (the folder or URI the driver was given)."""
    if local == source or os.path.isfile(os.path.join(local, "manifest.json")):
        return local
    return str(local_features(source))


def examples_source(source: str, local: str, task: str, split: str) -> tuple[str, object]:
    """(path, pyarrow file system or None) for Ray Data's read_parquet of a split: inside the URI's file system
    when `source` is a URI (any node can read it), else the local folder."""
    folder = str(examples_path(local, task, split))  # checks the split exists
    if storage.is_local(source):
        return folder, None
    fs, path = storage.filesystem(storage.join(source, "examples", task, split))
    return path, fs


def examples_path(features_dir: str | Path, task: str, split: str) -> Path:
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}")
    path = Path(features_dir) / "examples" / task / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing (features folder, docs/DATA.md section 3)")
    return path


def count_examples(features_dir: str | Path, task: str, split: str) -> int:
    return pads.dataset(examples_path(features_dir, task, split), format="parquet").count_rows()


def iter_examples(features_dir: str | Path, task: str, split: str, batch_size: int,
                  max_examples: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Example rows in file order as numpy batches (list columns become object arrays of arrays), like
    Ray Data's batch_format="numpy". max_examples > 0 stops after that many rows."""
    dataset = pads.dataset(examples_path(features_dir, task, split), format="parquet")
    seen = 0
    for record_batch in dataset.to_batches(batch_size=batch_size):
        if max_examples and seen >= max_examples:
            return
        if max_examples:
            record_batch = record_batch.slice(0, max_examples - seen)
        seen += record_batch.num_rows
        if record_batch.num_rows:
            yield {name: col.to_numpy(zero_copy_only=False)
                   for name, col in zip(record_batch.schema.names, record_batch.columns)}
