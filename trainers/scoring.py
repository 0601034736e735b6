"""Scores from a checkpoint: the one code path shared by offline evaluation and online serving.

    scorer = Scorer("CKPT", "FEATURES")
    hist = scorer.histories(rows)                     # users.parquet / example rows -> tensors
    scorer.video_scores(hist)                         # [B, V] over the whole video corpus
    scorer.comment_scores(hist, query_video, cands)   # [B, N] for given comment indices (-1 = padding)

Item vectors are precomputed once (`refresh_items`), so every caller ranks against the same matrices.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainers.checkpoint import CheckpointError, load_model
from trainers.data import collate_histories, load_text_tables


class Scorer:
    def __init__(self, ckpt_dir: str | Path, features_dir: str | Path, device: str = "cpu"):
        """Load the checkpoint (CheckpointError if it is missing, corrupt or incompatible) and the
        features folder's text embeddings, and precompute the item matrices."""
        self.kind, model = load_model(ckpt_dir)
        try:
            self._setup(model, features_dir, torch.device(device))
        except ValueError as err:  # e.g. the text embeddings' dimension differs from the model's
            raise CheckpointError(f"{ckpt_dir} does not fit the features in {features_dir}: {err}") from None

    @classmethod
    def from_model(cls, kind: str, model: nn.Module, features_dir: str | Path) -> "Scorer":
        """Wrap a model in memory (used for validation during training). Puts the model in eval mode;
        the caller switches it back to train mode."""
        scorer = cls.__new__(cls)
        scorer.kind = kind
        scorer._setup(model, features_dir, next(model.parameters()).device)
        return scorer

    def _setup(self, model: nn.Module, features_dir: str | Path, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device).eval()
        self.max_history = model.config.max_history
        self.temperature = model.temperature
        self.set_text_tables(*load_text_tables(features_dir))

    def set_text_tables(self, video_text: torch.Tensor, comment_text: torch.Tensor) -> None:
        """Attach (possibly grown) text matrices [V, D], [C, D] and recompute the item matrices."""
        self.model.set_text_tables(video_text, comment_text)
        self.num_videos, self.num_comments = video_text.shape[0], comment_text.shape[0]
        self.refresh_items()

    @torch.no_grad()
    def refresh_items(self, chunk: int = 65536) -> None:
        def matrix(fn, n):
            parts = [fn(torch.arange(i, min(i + chunk, n), device=self.device)) for i in range(0, n, chunk)]
            return torch.cat(parts) if parts else torch.zeros(0, self.model.config.hidden, device=self.device)

        self.video_matrix = matrix(self.model.video_item_vectors, self.num_videos)  # [V, H]
        self.comment_matrix = matrix(self.model.comment_item_vectors, self.num_comments)  # [C, H]

    def histories(self, rows: dict) -> dict[str, torch.Tensor]:
        """History columns (dict of lists or numpy arrays) -> the tensors the other methods take."""
        return collate_histories(rows, self.max_history)

    def _to_device(self, hist: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in hist.items()}

    def _gather(self, matrix: torch.Tensor, idx: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        if idx.numel() and int(idx.max()) >= matrix.shape[0]:
            raise ValueError(f"{kind} index {int(idx.max())} is beyond the {matrix.shape[0]} known {kind}s")
        return matrix[idx.clamp(min=0)], idx >= 0  # [B, N, H], [B, N]

    @torch.no_grad()
    def video_scores(self, hist: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cosine / temperature of each user against every video: [B, V] (CPU)."""
        user = self.model.user_video_vector(self._to_device(hist))  # [B, H]
        return (user @ self.video_matrix.T / self.temperature).cpu()

    @torch.no_grad()
    def video_candidate_scores(self, hist: dict[str, torch.Tensor], candidate_idx: torch.Tensor) -> torch.Tensor:
        """Scores of given videos [B, N] (-1 = padding, scored -inf): [B, N] (CPU)."""
        user = self.model.user_video_vector(self._to_device(hist))  # [B, H]
        items, valid = self._gather(self.video_matrix, candidate_idx, "video")
        scores = torch.einsum("bh,bnh->bn", user, items) / self.temperature
        return scores.masked_fill(~valid, float("-inf")).cpu()

    @torch.no_grad()
    def comment_scores(self, hist: dict[str, torch.Tensor], query_video_idx: torch.Tensor,
                       candidate_idx: torch.Tensor) -> torch.Tensor:
        """Scores of candidate comments [B, N] (-1 = padding, scored -inf) for users watching
        query_video_idx [B]: [B, N] (CPU)."""
        query = torch.as_tensor(query_video_idx, dtype=torch.long, device=self.device)
        context = self.model.comment_context_vector(self._to_device(hist), query)  # [B, H]
        items, valid = self._gather(self.comment_matrix, candidate_idx, "comment")
        scores = torch.einsum("bh,bnh->bn", context, items) / self.temperature
        return scores.masked_fill(~valid, float("-inf")).cpu()
