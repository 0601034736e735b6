"""SASRec baseline: IDs only, one causal Transformer per task (Kang and McAuley, 2018).

Same index inputs as the SR model and the same `Recommender` methods (trainers/models/base.py), so evaluation
and scoring treat both alike; it reads no text, so it is not a `TextRecommender`. Item and user vectors are
L2-normalised and scored as cosine / temperature (a common SASRec variant; the original uses a raw dot
product). Items beyond the ID tables score as zero vectors; items in the table but never trained keep their
random initial embedding (it is a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.config import require_at_least
from trainers.models.base import ModelSize
from trainers.models.layers import CausalEncoder, position_ids, safe_lookup


@dataclass
class SASRecConfig:
    num_videos: int = 1
    num_comments: int = 1
    size: ModelSize = field(default_factory=ModelSize)

    def __post_init__(self):
        require_at_least(self, 1, "num_videos", "num_comments")


class SASRec(nn.Module):
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

    def _last_state(self, elements: torch.Tensor, mask: torch.Tensor, pos: nn.Embedding,
                    encoder: CausalEncoder) -> torch.Tensor:
        x = elements + pos(position_ids(mask, self.config.size.max_history, randomize=False))
        states = encoder(self.drop(x), mask)  # [B, L, H]
        # Right-aligned: the newest element is in the last slot (for an empty history that slot is padding
        # and gives one learned "cold" vector).
        return states[:, -1]  # [B, H]

    def user_video_vector(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        elements = safe_lookup(self.video_id, batch["hist_video"])  # [B, L, H]
        user = self._last_state(elements, batch["hist_video_mask"], self.video_pos, self.video_encoder)
        return F.normalize(user, dim=-1)

    def video_item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        return F.normalize(safe_lookup(self.video_id, idx), dim=-1)  # [N, H]

    def comment_context_vector(self, batch: dict[str, torch.Tensor], query_video: torch.Tensor) -> torch.Tensor:
        cmts = batch["hist_cmt_comments"]  # [B, L, 3]
        count = (cmts >= 0).sum(-1, keepdim=True).clamp(min=1)
        elements = safe_lookup(self.comment_id, cmts).sum(-2) / count  # [B, L, H] mean of the record's comments
        state = self._last_state(elements, batch["hist_cmt_mask"], self.comment_pos, self.comment_encoder)
        context = self.context_proj(torch.cat([state, safe_lookup(self.video_id, query_video)], -1))
        return F.normalize(context, dim=-1)  # [B, H]

    def comment_item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        return F.normalize(safe_lookup(self.comment_id, idx), dim=-1)  # [N, H]
