"""Popularity baselines (no training).

- video: number of positive interactions with the video in the train split, i.e. how often it is the target
  of a train example of the video task (a global count: it may include interactions after an example's time
  for valid/test; DESIGN.md's popularity-before-t for videos would need per-event counts in the features);
- comment: likes the comment received before the example's time (target_likes / negative_likes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch

from trainers.data import examples_path


def video_train_counts(features_dir: str | Path, num_videos: int) -> np.ndarray:
    """[V] int64: positive train interactions per video_idx."""
    table = pads.dataset(examples_path(features_dir, "video", "train"), format="parquet").to_table(
        columns=["target"])
    targets = table.column("target").to_numpy().astype(np.int64)
    if len(targets) and (targets.min() < 0 or targets.max() >= num_videos):
        raise ValueError(f"video train targets outside [0, {num_videos})")
    return np.bincount(targets, minlength=num_videos)


def popularity_video_scores(counts: np.ndarray, candidate_idx: torch.Tensor) -> torch.Tensor:
    """candidate_idx [B, N] (-1 = padding) -> train counts as float scores [B, N], -inf under padding."""
    idx = candidate_idx.numpy()
    scores = counts[np.clip(idx, 0, None)].astype(np.float64)
    return torch.from_numpy(np.where(idx >= 0, scores, -np.inf))


def popularity_comment_scores(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Likes before t of [target, negatives...] -> [B, 1 + K] float, -inf under padding."""
    likes = torch.cat([batch["target_likes"][:, None], batch["negative_likes"]], 1).double()
    valid = torch.cat([torch.ones_like(batch["target"][:, None], dtype=torch.bool), batch["negatives"] >= 0], 1)
    return likes.masked_fill(~valid, float("-inf"))
