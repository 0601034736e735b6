"""What every trainable model shares: its size (`ModelSize`) and what callers may call on it (`Recommender`).

    size = ModelSize(hidden=128)      # defaults: the paper's released configuration; `size.hidden=128` as an override
    SRConfig(text_dim=384, size=size), SASRecConfig(size=size), AlignConfig(..., size=size), FinetuneConfig(...)
    if isinstance(model, TextRecommender): model.set_text_tables(video_text, comment_text)

Training (trainers/losses.py), evaluation and scoring (trainers/scoring.py) call `Recommender`'s members on
any model. A model that reads the features folder's text embeddings and publication times (the SR model) is
also a `TextRecommender`; SASRec reads IDs only and is not one, so callers check before attaching tables. The
SR model's other extras are called only where its config says it has them: the age terms with
`has_time_features`, the ID embeddings (set_seen, id_text_vectors) with model "sr" and use_id_embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from core.config import require, require_at_least


@dataclass
class ModelSize:
    """Model sizes shared by both stages (stage 2 loads stage 1's weights strictly, so they must agree)."""

    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner: int = 256  # feed-forward width
    dropout: float = 0.3
    max_history: int = 50  # history elements a model reads (the newest)
    temperature: float = 0.07  # score = cosine / temperature

    def __post_init__(self):
        require_at_least(self, 1, "hidden", "num_layers", "num_heads", "inner", "max_history")
        require(self, self.hidden % self.num_heads == 0, "hidden", f"must be divisible by num_heads {self.num_heads}")
        require(self, 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self, self.temperature > 0, "temperature", "must be > 0")


SIZE_FIELDS = tuple(ModelSize.__dataclass_fields__)


def nest_size(fields: dict) -> dict:
    """A model config's fields as config.json held them before ModelSize (hidden, num_layers, ... at the top)
    -> the same with those fields under "size"; a nested config comes back as it is."""
    flat = {k: v for k, v in fields.items() if k in SIZE_FIELDS}
    if not flat or "size" in fields:  # nested already (both at once: from_dict names the stray keys)
        return fields
    rest = {k: v for k, v in fields.items() if k not in SIZE_FIELDS}
    return {**rest, "size": flat}


class ModelConfig(Protocol):
    num_videos: int
    num_comments: int
    size: ModelSize


@runtime_checkable
class Recommender(Protocol):
    """Every trainable model. Returned vectors are L2-normalised; a score is dot / temperature."""

    config: ModelConfig
    temperature: float

    def user_video_vector(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Collated histories (trainers/data.py) -> user vectors [B, H]."""

    def video_item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Video indices [...] -> [..., H]."""

    def comment_context_vector(self, batch: dict[str, torch.Tensor], query_video: torch.Tensor) -> torch.Tensor:
        """Histories and the video being watched [B] -> user-in-context vectors [B, H]."""

    def comment_item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Comment indices [...] -> [..., H]."""


@runtime_checkable
class TextRecommender(Recommender, Protocol):
    """A model over the features folder's text embeddings and publication times, attached after loading
    (they are not part of the checkpoint: they grow as new items arrive)."""

    def set_text_tables(self, video_text: torch.Tensor, comment_text: torch.Tensor) -> None:
        """Text embeddings [V, D] and [C, D], row = item index."""

    def set_item_times(self, video_ts: torch.Tensor, comment_ts: torch.Tensor) -> None:
        """Publication times (ms) [V] and [C], row = item index."""


def has_time_features(model: Recommender) -> bool:
    """Whether the model's item vectors include the item's age, so they need the request time ts
    (trainers/models/sr.py; SRConfig.time_features)."""
    return bool(getattr(model.config, "time_features", False))
