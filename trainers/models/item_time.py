"""Item age in the scores of a model (SR and SASRec alike): a user-dependent age term and a user-independent
freshness score.

A score is  (user . item + user . age[bucket] + freshness(item, pool, t)) / temperature:

- `user . age[bucket]`: a [num_buckets, H] table per kind over log-time buckets (layers.time_buckets), added to
  the normalised item vector, so how much age matters can differ from user to user;
- `freshness`: a small MLP per kind over five continuous features, the same for every user, so "newer is
  better" is learned once instead of in every user vector's direction:
    1. log-age at the request time,
    2. log of the time since the newest candidate of the item's pool was published,
    3. log of the number of pool items newer than it (its position by age),
    4. 1 / (1 + that number) and 5. 1 / (1 + hours since the newest): sharp near the top of the pool, where
       the log features barely move (the newest item is often the answer on real feeds).
  The video pool is every video published before the request (an alive window only removes older ones,
  which changes neither 2 nor 3), so the features come from the sorted publication times alone and a
  sampled candidate list, the whole corpus and a serving request all see the same values. The comment pool is
  the candidate list itself: the comments under the video being watched, as training, evaluation and serving
  each pass them.
  Its last layer starts at zero: an untrained model scores as if it had no freshness term.

Publication times are attached with `set_item_times` (not part of the checkpoint: they grow with the catalog).
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.models.layers import MINUTE_MS, time_buckets

KINDS = ("video", "comment")
FRESHNESS_FEATURES = 5
LOG_SCALE = 8.0  # log1p(minutes) reaches about 13 at one year: divided by this, features stay near [0, 2]
HOUR_MS = 3_600_000


def _log_minutes(ms: torch.Tensor) -> torch.Tensor:
    return torch.log1p(ms.clamp(min=0).double() / MINUTE_MS) / LOG_SCALE


def freshness_features(age_ms: torch.Tensor, since_newest_ms: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
    """[...] int64 each -> [..., 5] float32 (computed in float64 from integers, so every caller that
    passes the same integers gets the same bits)."""
    newer = newer.clamp(min=0).double()
    hours = since_newest_ms.clamp(min=0).double() / HOUR_MS
    return torch.stack([_log_minutes(age_ms), _log_minutes(since_newest_ms), torch.log1p(newer) / LOG_SCALE,
                        1 / (1 + newer), 1 / (1 + hours)], -1).float()


def video_pool_features(pub_sorted: torch.Tensor, item_pub: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Freshness features of videos published at item_pub [...] at request times ts (broadcastable), against
    every video published before ts (pub_sorted [V], ascending) -> [..., 5]."""
    ts = torch.as_tensor(ts, device=item_pub.device).expand_as(item_pub).contiguous()
    before = torch.searchsorted(pub_sorted, ts)  # videos published strictly before the request
    newest = pub_sorted[(before - 1).clamp(min=0)]
    newest = torch.where(before > 0, newest, item_pub)
    newer = before - torch.searchsorted(pub_sorted, item_pub.contiguous(), right=True)
    return freshness_features(ts - item_pub, newest - item_pub, newer)


def list_features(item_pub: torch.Tensor, valid: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Freshness features of candidate lists [B, N] (valid False on padding) at request times ts [B] or
    [B, 1], each list being its own pool -> [B, N, 5]."""
    ts = torch.as_tensor(ts, device=item_pub.device).reshape(-1, 1)
    floor = torch.iinfo(torch.long).min
    pub = torch.where(valid, item_pub, torch.full_like(item_pub, floor))
    ordered = pub.sort(dim=-1).values
    newer = (valid.sum(-1, keepdim=True) - (torch.searchsorted(ordered, pub, right=True)
                                           - (~valid).sum(-1, keepdim=True)))
    newest = ordered[:, -1:]
    return freshness_features(ts - item_pub, newest - item_pub, newer)


class FreshnessHead(nn.Module):
    """features [..., 5] -> score [...] (cosine units: the caller divides by the temperature).

    The output is multiplied by a fixed `gain`: AdamW moves every weight by about the learning rate per step
    whatever its gradient, so the gain makes this head's output move `gain` times faster than a plain layer.
    It starts at zero and must reach several logits within the few hundred steps of a stage 2 run, where
    freshness decides most of the ranking (measured on the freshness set: BENCHMARKS.md)."""

    def __init__(self, width: int = 32, gain: float = 10.0):
        super().__init__()
        self.gain = gain
        self.hidden = nn.Linear(FRESHNESS_FEATURES, width)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(features))).squeeze(-1) * self.gain


class ItemTimes:
    """Mixed into an nn.Module model whose config has time_features, num_time_buckets and freshness. Call
    `init_item_times(hidden)` in __init__ (after the model's other parameters, so that with the same seed they
    are initialised as without time features); parameter names stay video_age / comment_age (checkpoints of
    earlier versions load unchanged) and video_fresh / comment_fresh."""

    def init_item_times(self, hidden: int) -> None:
        n = self.config.num_time_buckets
        self.video_age = nn.Embedding(n, hidden)
        self.comment_age = nn.Embedding(n, hidden)
        nn.init.zeros_(self.video_age.weight)
        nn.init.zeros_(self.comment_age.weight)
        if self.config.freshness:
            self.video_fresh = FreshnessHead()
            self.comment_fresh = FreshnessHead()
        self.register_buffer("video_pub_ts", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("comment_pub_ts", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("video_pub_sorted", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_item_times(self, video_ts: torch.Tensor, comment_ts: torch.Tensor) -> None:
        """Attach the publication times (ms) [V] and [C] (rows = item index); a no-op without time features."""
        if not self.config.time_features:
            return
        for name, times in (("video", video_ts), ("comment", comment_ts)):
            if torch.as_tensor(times).ndim != 1:
                raise ValueError(f"{name} publication times must be 1-D, got shape {tuple(torch.as_tensor(times).shape)}")
        device = self.video_age.weight.device
        self.video_pub_ts = torch.as_tensor(video_ts, dtype=torch.long).to(device)
        self.comment_pub_ts = torch.as_tensor(comment_ts, dtype=torch.long).to(device)
        self.video_pub_sorted = self.video_pub_ts.sort().values

    def published(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        """Publication times of items idx [...] (padding -1 reads item 0's; callers mask it)."""
        if not self.config.time_features:
            raise RuntimeError("publication times need time_features=True")
        if kind not in KINDS:
            raise ValueError(f"kind must be 'video' or 'comment', got {kind!r}")
        pub = self.video_pub_ts if kind == "video" else self.comment_pub_ts
        if pub.shape[0] == 0:
            raise RuntimeError(f"no {kind} publication times attached: call set_item_times first")
        if idx.numel() and int(idx.max()) >= pub.shape[0]:
            raise ValueError(f"{kind} index {int(idx.max())} has no publication time ({pub.shape[0]} known)")
        return pub[idx.clamp(min=0)]

    def age_buckets(self, kind: str, idx: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """Age bucket of items idx [...] at request times ts (broadcastable to idx, e.g. [B] for [B] or [B, 1]
        for [B, K]) -> [...] long. Padding (idx < 0) gets bucket 0; its vectors are masked by the callers."""
        age = torch.as_tensor(ts, device=idx.device) - self.published(kind, idx)
        return time_buckets(age, self.config.num_time_buckets) * (idx >= 0)

    def age_table(self, kind: str) -> torch.Tensor:
        """The [num_time_buckets, H] age terms added to normalised item vectors of `kind`."""
        if not self.config.time_features:
            raise RuntimeError("age_table needs time_features=True")
        return (self.video_age if kind == "video" else self.comment_age).weight

    def with_age(self, kind: str, unit: torch.Tensor, idx: torch.Tensor, ts: torch.Tensor | None) -> torch.Tensor:
        """Normalised item vectors [..., H] plus their age terms at request times ts."""
        if not self.config.time_features:
            return unit
        if ts is None:
            raise ValueError(f"{kind}_item_vectors: this model has time features and needs the request time ts")
        buckets = self.age_buckets(kind, idx, ts)
        return unit + self.age_table(kind)[buckets] * (idx >= 0).unsqueeze(-1)

    def age_scores(self, kind: str, query: torch.Tensor, idx: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """The item-age part of the scores of items idx [B, N] for query vectors [B, H] at request times ts
        [B, 1]: query . age[bucket] / T, as the [B, num_buckets] table query @ age_table.T / T gathered at each
        item's bucket (no [B, N, H] keys), plus the freshness score -> [B, N]. Padding is not masked here."""
        per_bucket = query @ self.age_table(kind).T / self.temperature  # [B, num_buckets]
        return per_bucket.gather(1, self.age_buckets(kind, idx, ts)) + self.freshness_scores(kind, idx, ts)

    def freshness_scores(self, kind: str, idx: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """The user-independent part of the scores (already divided by the temperature), 0 on padding.
        Videos: idx [...] with ts broadcastable to it. Comments: candidate lists idx [B, N] (the pool) with ts
        [B] or [B, 1]. Zeros for a model without the freshness heads."""
        if not (self.config.time_features and self.config.freshness):
            return torch.zeros(idx.shape, device=idx.device)
        pub = self.published(kind, idx)
        if kind == "video":
            features = video_pool_features(self.video_pub_sorted, pub, ts)
        else:
            if idx.ndim != 2:
                raise ValueError(f"comment freshness needs candidate lists [B, N], got shape {tuple(idx.shape)}")
            features = list_features(pub, idx >= 0, ts)
        head = self.video_fresh if kind == "video" else self.comment_fresh
        return head(features) / self.temperature * (idx >= 0)
