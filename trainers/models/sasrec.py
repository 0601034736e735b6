"""SASRec baseline: IDs only, one causal Transformer per task (Kang and McAuley, 2018).

Same index inputs as the SR model and the same `Recommender` methods (trainers/models/base.py), so evaluation
and scoring treat both alike; it reads no text, so it is not a `TextRecommender`. Item and user vectors are
L2-normalised and scored as cosine / temperature (a common SASRec variant; the original uses a raw dot
product). Items beyond the ID tables score as zero vectors; items in the table but never trained keep their
random initial embedding (it is a baseline).

With `time_features` it reads time as the SR model does: a gap embedding per history element, the
user-dependent age term and the user-independent freshness score on every scored item
(trainers/models/item_time.py). Off by default so that a config saved without the field loads as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.config import require_at_least
from trainers.models.base import ModelSize
from trainers.models.item_time import ItemTimes
from trainers.models.layers import CausalEncoder, position_ids, safe_lookup, time_buckets


@dataclass
class SASRecConfig:
    num_videos: int = 1
    num_comments: int = 1
    size: ModelSize = field(default_factory=ModelSize)
    time_features: bool = False  # gap embeddings, age terms and the freshness score (module docstring)
    num_time_buckets: int = 48

    def __post_init__(self):
        require_at_least(self, 1, "num_videos", "num_comments")
        require_at_least(self, 2, "num_time_buckets")

    @property
    def freshness(self) -> bool:  # ItemTimes asks; SASRec has it whenever it has time features
        return self.time_features


class SASRec(ItemTimes, nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        size = config.size
        self.temperature = size.temperature
        h = size.hidden
        self.video_id = nn.Embedding(config.num_videos, h)
        self.comment_id = nn.Embedding(config.num_comments, h)
        self.video_pos = nn.Embedding(size.max_history, h)
        self.comment_pos = nn.Embedding(size.max_history, h)
        for table in (self.video_id, self.comment_id, self.video_pos, self.comment_pos):
            nn.init.normal_(table.weight, std=0.02)
        self.drop = nn.Dropout(size.dropout)
        self.video_encoder = CausalEncoder(size)
        self.comment_encoder = CausalEncoder(size)
        self.context_proj = nn.Linear(2 * h, h)
        if config.time_features:
            self.video_gap = nn.Embedding(config.num_time_buckets, h)
            self.comment_gap = nn.Embedding(config.num_time_buckets, h)
            nn.init.normal_(self.video_gap.weight, std=0.02)
            nn.init.normal_(self.comment_gap.weight, std=0.02)
            self.init_item_times(h)

    def _last_state(self, elements: torch.Tensor, mask: torch.Tensor, pos: nn.Embedding,
                    encoder: CausalEncoder, gap: torch.Tensor | None) -> torch.Tensor:
        x = elements + pos(position_ids(mask, self.config.size.max_history, randomize=False))
        if gap is not None:
            x = x + gap
        states = encoder(self.drop(x), mask)  # [B, L, H]
        # Right-aligned: the newest element is in the last slot (for an empty history that slot is padding
        # and gives one learned "cold" vector).
        return states[:, -1]  # [B, H]

    def _gap(self, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, L, H] gap embeddings of a history (how long before the request each element happened)."""
        if not self.config.time_features:
            return None
        if "ts" not in batch:
            raise ValueError("time_features needs the request time: the batch has no 'ts' [B]")
        elapsed = batch["ts"][:, None] - batch["hist_video_ts" if kind == "video" else "hist_cmt_ts"]
        table = self.video_gap if kind == "video" else self.comment_gap
        return table(time_buckets(elapsed, self.config.num_time_buckets))

    def user_video_vector(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        elements = safe_lookup(self.video_id, batch["hist_video"])  # [B, L, H]
        user = self._last_state(elements, batch["hist_video_mask"], self.video_pos, self.video_encoder,
                                self._gap("video", batch))
        return F.normalize(user, dim=-1)

    def timeless_item_vectors(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        """The normalised item vectors without the age term, [...] -> [..., H]."""
        if kind not in ("video", "comment"):
            raise ValueError(f"kind must be 'video' or 'comment', got {kind!r}")
        return F.normalize(safe_lookup(self.video_id if kind == "video" else self.comment_id, idx), dim=-1)

    def video_item_vectors(self, idx: torch.Tensor, ts: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_age("video", self.timeless_item_vectors("video", idx), idx, ts)  # [..., H]

    def comment_context_vector(self, batch: dict[str, torch.Tensor], query_video: torch.Tensor) -> torch.Tensor:
        cmts = batch["hist_cmt_comments"]  # [B, L, 3]
        count = (cmts >= 0).sum(-1, keepdim=True).clamp(min=1)
        elements = safe_lookup(self.comment_id, cmts).sum(-2) / count  # [B, L, H] mean of the record's comments
        state = self._last_state(elements, batch["hist_cmt_mask"], self.comment_pos, self.comment_encoder,
                                 self._gap("comment", batch))
        context = self.context_proj(torch.cat([state, safe_lookup(self.video_id, query_video)], -1))
        return F.normalize(context, dim=-1)  # [B, H]

    def comment_item_vectors(self, idx: torch.Tensor, ts: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_age("comment", self.timeless_item_vectors("comment", idx), idx, ts)  # [..., H]
