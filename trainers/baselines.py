"""Baselines that need no training.

- `popularity` (video): how often the video is the target of a train example of the video task. Under the
  default split (global_time) every train example lies before the valid cut, so no evaluation-period event
  counts; under leave_last_out other users' later events do. Comment: likes before t.
- Time-aware (issue 8), all strictly before the example's time t: video `recency` (newest first),
  `popularity_at_t` (positive interactions before t, CountsBefore) and `recency_pop_blend`
  (log1p(count) - age / tau, tau tuned on valid); comment `newest`, `most_engaged` (likes + replies before t)
  and `top_level` (top-level comments first, then newest).
"""

from __future__ import annotations

import numpy as np
import torch

from features.folder import FeaturesFolder

# Every baseline of each task by the name evaluation gives it (trainers/evaluate.py).
NAMES = {"video": ("popularity", "recency", "popularity_at_t", "recency_pop_blend"),
         "comment": ("popularity", "newest", "most_engaged", "top_level")}


def video_train_counts(folder: FeaturesFolder) -> np.ndarray:
    """[V] int64: positive train interactions per video_idx."""
    num_videos = folder.num_videos
    targets = folder.examples_table("video", "train", ["target"]).column("target").to_numpy().astype(np.int64)
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


# ---------------------------------------------------------------------------------------------- time-aware
#
# Baselines that know only time (issue 8): a model has to beat them to show it learned more than freshness.
# Scores are float64 [B, N] over candidate indices [B, N] (-1 = padding -> -inf); higher ranks first.

BLEND_TAUS_H = (1.0, 3.0, 6.0, 12.0, 24.0, 48.0, 96.0, 192.0)  # grid of recency_pop_blend, tuned on valid
_KEY_SHIFT = 1 << 42  # (item, ts) packed into one int64: ts < 2^42 ms (year 2109), item < 2^21


def _masked(idx: np.ndarray, scores: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(idx >= 0, scores.astype(np.float64), -np.inf))


class CountsBefore:
    """How many interactions each item had strictly before a time: interactions (item, ts), any order."""

    def __init__(self, items: np.ndarray, ts: np.ndarray):
        items, ts = np.asarray(items, np.int64), np.asarray(ts, np.int64)
        if len(ts) and (ts.min() < 0 or ts.max() >= _KEY_SHIFT or items.min() < 0 or items.max() >= 1 << 21):
            raise ValueError("CountsBefore: ts must be in [0, 2^42) and items in [0, 2^21)")
        self.keys = np.sort(items * _KEY_SHIFT + ts)

    def __call__(self, idx: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """idx [B, N], ts [B] -> counts [B, N] of interactions with idx[b, n] at a time < ts[b]."""
        item = np.clip(np.asarray(idx, np.int64), 0, None)
        upto = np.searchsorted(self.keys, item * _KEY_SHIFT + np.asarray(ts, np.int64)[:, None], side="left")
        first = np.searchsorted(self.keys, item * _KEY_SHIFT, side="left")
        return np.where(np.asarray(idx) >= 0, upto - first, 0)  # padding: none


def recency_scores(item_ts: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Newest first: the publication time of each candidate."""
    return _masked(idx, np.asarray(item_ts, np.float64)[np.clip(idx, 0, None)])


def blend_scores(item_ts: np.ndarray, counts: np.ndarray, idx: np.ndarray, ts: np.ndarray,
                 tau_h: float) -> torch.Tensor:
    """recency x popularity: log((1 + interactions before t) x exp(-age / tau)) = log1p(count) - age / tau."""
    age_h = (np.asarray(ts, np.float64)[:, None] - np.asarray(item_ts, np.float64)[np.clip(idx, 0, None)]) / 3.6e6
    return _masked(idx, np.log1p(counts) - age_h / tau_h)


def top_level_scores(parent_is_null: np.ndarray, item_ts: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Top-level comments first, newest first among equals (ties would count against the target)."""
    safe = np.clip(idx, 0, None)
    ts = np.asarray(item_ts, np.float64)[safe]
    # Every top-level comment above every reply: the time term stays below 1.
    scaled = (ts - ts.min(initial=0)) / (np.ptp(ts) + 1.0) if ts.size else ts
    return _masked(idx, np.asarray(parent_is_null, np.float64)[safe] + scaled)
