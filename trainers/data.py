"""From the features folder (docs/DATA.md section 3) to model inputs.

`collate` turns a batch of example rows into padded index tensors. Histories are kept newest-last and
right-aligned: padding (-1, mask False) first, the newest element in the last slot, at most `max_history`
elements (the oldest are dropped). Each batch is padded to its own longest history (at least 1 slot), which
the models handle because position ids count back from the newest slot (trainers/models/layers.py).

Text embeddings are not copied into batches: `text_tensors` wraps the features folder's memory-mapped .npy
matrices once per process and the models index them on their own device.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from core.contract import COMMENTS_PER_RECORD
from features.arrays import sample_excluding
from features.folder import FeaturesFolder


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


def text_tensors(folder: FeaturesFolder) -> tuple[torch.Tensor, torch.Tensor]:
    """(video_emb [V, D], comment_emb [C, D]) as CPU tensors over the folder's read-only memory maps, made
    once per process and folder."""
    return _text_tensors(str(folder.root))


@functools.lru_cache(maxsize=4)
def _text_tensors(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        # Read-only memory map: torch warns it is not writable; nothing ever writes to it.
        warnings.simplefilter("ignore", UserWarning)
        return tuple(torch.from_numpy(t) for t in FeaturesFolder(root).text_tables())


def item_time_tensors(folder: FeaturesFolder) -> tuple[torch.Tensor, torch.Tensor]:
    """(video publication ts [V], comment publication ts [C]) in ms, long, row = item index: the reference
    points of item ages."""
    return tuple(torch.from_numpy(t) for t in folder.item_times())


def fresh_video_negatives(lo: np.ndarray, hi: np.ndarray, target: np.ndarray, k: int,
                          rng: np.random.Generator) -> torch.Tensor:
    """[B, k] long: for each example, up to k distinct videos drawn uniformly from its alive pool (item indices
    lo..hi-1: FeaturesFolder.alive_bounds), never the target; -1 pads rows whose pool is smaller. Training
    draws anew every step, so its negatives change from epoch to epoch and follow the pool's age
    distribution; evaluation keeps the stored, seeded ones."""
    out = np.full((len(target), k), -1, np.int64)
    for i, (a, b, t) in enumerate(zip(np.asarray(lo).tolist(), np.asarray(hi).tolist(), np.asarray(target).tolist())):
        drawn = sample_excluding(rng, a, b, t, k)
        out[i, : len(drawn)] = drawn
    return torch.from_numpy(out)


def user_video_positives(folder: FeaturesFolder, splits: tuple[str, ...]) -> dict[tuple[str, int], set[int]]:
    """{(user_id, video_idx): the comments the user engaged with under it}, from the targets of the comment
    examples in `splits` (training reads its own split only, evaluation every split)."""
    out: dict[tuple[str, int], set[int]] = {}
    for split in splits:
        table = folder.examples_table("comment", split, ["user_id", "query_video", "target"])
        for user, video, target in zip(*(table[c].to_pylist() for c in ("user_id", "query_video", "target"))):
            out.setdefault((user, video), set()).add(target)
    return out


def without_later_positives(rows: dict, positives: dict[tuple[str, int], set[int]]) -> dict:
    """Comment example rows (numpy batch) whose candidates (negatives, negative_likes) no longer hold another
    positive of the same user under the same video. The build already took out the earlier ones
    (features/stage_b.py); this takes out those that came later, known only when the whole split is."""
    negatives, likes = list(rows["negatives"]), list(rows["negative_likes"])
    changed = False
    for i, (user, video, target) in enumerate(zip(rows["user_id"], rows["query_video"], rows["target"])):
        others = positives.get((user, int(video)), set()) - {int(target)}
        if others and len(negatives[i]) and not others.isdisjoint(negatives[i].tolist()):
            keep = np.array([c not in others for c in negatives[i].tolist()])
            negatives[i], likes[i] = negatives[i][keep], likes[i][keep]
            changed = True
    if not changed:
        return rows
    return {**rows, "negatives": object_column(negatives), "negative_likes": object_column(likes)}


def object_column(values: list) -> np.ndarray:
    """[N] object array holding one list value per row (np.array would make a 2-D array of equal-length rows,
    or fail on ragged ones)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out
