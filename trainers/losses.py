"""Stage 2 losses (DESIGN.md section 6), written against the model methods shared by SR and SASRec.

In-batch negatives are those of this worker's batch only; gathering them across workers (differentiable
all-gather) is a later issue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def in_batch_logits(queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """queries, keys [B, H] (row i of keys is the positive of row i of queries), ids [B] item ids of the
    keys -> logits [B, B]. An off-diagonal key with the same id as the row's own is the same item appearing
    twice in the batch, not a negative: it is masked to -inf."""
    logits = queries @ keys.T / temperature  # [B, B]
    duplicate = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    return logits.masked_fill(duplicate, float("-inf"))


def video_loss(model: nn.Module, batch: dict[str, torch.Tensor], train_negatives: int) -> torch.Tensor:
    """InfoNCE of the user vector against its target video: negatives are the other targets of the batch
    plus up to `train_negatives` of the example's own sampled negatives (videos alive at its time)."""
    target = batch["target"]  # [B]
    user = model.user_video_vector(batch)  # [B, H]
    logits = in_batch_logits(user, model.video_item_vectors(target), target, model.temperature)
    if train_negatives > 0:
        negatives = batch["negatives"][:, :train_negatives]  # [B, K]
        neg_logits = torch.einsum("bh,bkh->bk", user, model.video_item_vectors(negatives)) / model.temperature
        drop = (negatives < 0) | (negatives == target[:, None])
        logits = torch.cat([logits, neg_logits.masked_fill(drop, float("-inf"))], 1)  # [B, B + K]
    return F.cross_entropy(logits, torch.arange(len(target), device=target.device))


def comment_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Softmax over [target, the example's candidate negatives] (padding masked); an example without
    negatives contributes 0."""
    context = model.comment_context_vector(batch, batch["query_video"])  # [B, H]
    candidates = torch.cat([batch["target"][:, None], batch["negatives"]], 1)  # [B, 1 + K]
    logits = torch.einsum("bh,bkh->bk", context, model.comment_item_vectors(candidates)) / model.temperature
    logits = logits.masked_fill(candidates < 0, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(candidates), dtype=torch.long, device=candidates.device))


def id_text_loss(model: nn.Module, video_idx: torch.Tensor | None, comment_idx: torch.Tensor | None,
                 temperature: float) -> torch.Tensor | None:
    """Symmetric InfoNCE between the ID embedding and the adapted text embedding of the same items (the
    distinct items of the batch); None when there is nothing to contrast."""
    terms = []
    for kind, idx in (("video", video_idx), ("comment", comment_idx)):
        if idx is None:
            continue
        idx = idx.unique()
        if len(idx) < 2:
            continue
        ids, text = model.id_text_vectors(kind, idx)  # [N, H] each
        logits = ids @ text.T / temperature
        labels = torch.arange(len(idx), device=idx.device)
        terms.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    return torch.stack(terms).mean() if terms else None
