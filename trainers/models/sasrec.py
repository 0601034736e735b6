"""SASRec baseline: IDs only, one causal Transformer per task (Kang and McAuley, 2018).

Same index inputs and method names as the SR model, so evaluation and scoring treat both alike. Item and
user vectors are L2-normalised and scored as cosine / temperature (a common SASRec variant; the original
uses a raw dot product). Items beyond the ID tables score as zero vectors; items in the table but never
trained keep their random initial embedding (it is a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models.layers import CausalEncoder, position_ids, safe_lookup


@dataclass
class SASRecConfig:
    num_videos: int = 1
    num_comments: int = 1
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner: int = 256
    dropout: float = 0.3
    max_history: int = 50
    temperature: float = 0.07

    def __post_init__(self):
        for name in ("num_videos", "num_comments", "hidden", "num_layers", "num_heads", "inner", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.num_heads:
            raise ValueError(f"SASRecConfig.hidden {self.hidden} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.temperature <= 0:
            raise ValueError(f"SASRecConfig.temperature must be > 0, got {self.temperature}")


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.temperature = config.temperature
        h = config.hidden
        self.video_id = nn.Embedding(config.num_videos, h)
        self.comment_id = nn.Embedding(config.num_comments, h)
        self.video_pos = nn.Embedding(config.max_history, h)
        self.comment_pos = nn.Embedding(config.max_history, h)
        for table in (self.video_id, self.comment_id, self.video_pos, self.comment_pos):
            nn.init.normal_(table.weight, std=0.02)
        self.drop = nn.Dropout(config.dropout)
        args = (h, config.num_heads, config.inner, config.num_layers, config.dropout)
        self.video_encoder = CausalEncoder(*args)
        self.comment_encoder = CausalEncoder(*args)
        self.context_proj = nn.Linear(2 * h, h)

    def set_text_tables(self, video_text: torch.Tensor, comment_text: torch.Tensor) -> None:
        """IDs only: text is ignored (kept so callers treat all models alike)."""

    def _last_state(self, elements: torch.Tensor, mask: torch.Tensor, pos: nn.Embedding,
                    encoder: CausalEncoder) -> torch.Tensor:
        x = elements + pos(position_ids(mask, self.config.max_history, randomize=False))
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
