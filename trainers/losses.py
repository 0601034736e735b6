"""Losses of both stages (DESIGN.md section 6), written against the model methods shared by SR and SASRec.

Stage 2 (`video_loss`, `comment_loss`, `id_text_loss`) uses this worker's batch for in-batch negatives.
Stage 1 (`info_nce`, `seq_sup_contrast`, `vc_contrast`, `global_mean`) gathers negatives from every worker
with a differentiable all-gather (`gather_rows`) and scales each worker's loss so that the *average* of the
workers' gradients (what trainers/loop.average_gradients computes) equals the gradient of one worker
running the whole global batch: worker loss = (sum over its rows) x world / (global row count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainers.models.base import Recommender, has_time_features
from trainers.models.sr import SRModel


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherPadded(torch.autograd.Function):
    """all_gather of equally sized (padded) tensors; backward sums the gradients of every worker's loss
    for this worker's slice (so keys used as negatives elsewhere still get their gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)  # [W, n_max, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Row counts of every worker, in rank order ([n] when not distributed)."""
    if _world() == 1:
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(_world())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Rows of every worker concatenated in rank order: [n_rank, ...] -> [sum n, ...], differentiable.
    Workers may hold different row counts (the last batch of an epoch): each pads to the largest, and the
    padding is cut off again, so callers never see it."""
    if _world() == 1:
        return x
    sizes = sizes or gather_sizes(len(x), x.device)
    if max(sizes) == 0:
        return x
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))]) if len(x) < max(sizes) else x
    stacked = _GatherPadded.apply(padded)  # [W, n_max, ...]
    return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)])


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Per-row losses [n] of this worker -> sum x world / global n (see the module docstring); 0 (with a
    graph) when no worker has a row."""
    total = sum(gather_sizes(len(values), values.device))
    return values.sum() * _world() / max(total, 1)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float,
             ids: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with negatives from every worker. queries, keys [n, H] L2-normalised (key i is the positive
    of query i); ids [n] (optional) item ids of the keys: another key with the same id is the same item, not
    a negative, and is masked out. Returns the worker's share of the global mean (module docstring)."""
    if queries.shape != keys.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} differ in shape")
    sizes = gather_sizes(len(queries), queries.device)
    rank = dist.get_rank() if _world() > 1 else 0
    offset = sum(sizes[:rank])
    all_keys = gather_rows(keys, sizes)  # [N, H]
    logits = queries @ all_keys.T / temperature  # [n, N]
    labels = torch.arange(len(queries), device=queries.device) + offset
    if ids is not None:
        all_ids = gather_rows(ids, sizes)  # [N] (integers: no gradient)
        same = ids[:, None] == all_ids[None, :]
        same[torch.arange(len(ids), device=ids.device), labels] = False
        logits = logits.masked_fill(same, float("-inf"))
    return global_mean(F.cross_entropy(logits, labels, reduction="none"))


def seq_sup_contrast(sr: torch.Tensor, llm: torch.Tensor, temperature: float,
                     users: torch.Tensor | None = None) -> torch.Tensor:
    """Sequential-supplemental contrast, both directions: SR user vectors [n, H] vs LLM preference vectors
    [n, H] of the same examples (L2-normalised), negatives from every worker. users [n] (optional) are user
    keys: another example of the same user is no negative (its near-identical history would be one that
    cannot be told apart), so it is masked out of the denominators."""
    return (info_nce(sr, llm, temperature, users) + info_nce(llm, sr, temperature, users)) / 2


def vc_contrast(llm: torch.Tensor, video_head: torch.Tensor, comment_head: torch.Tensor, is_video: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Video-comment preference contrast: a 2-way softmax per example over [LLM . SR video-head vector,
    LLM . SR comment-head vector] (all [n, H], L2-normalised; the heads' own user vectors, the comment head
    query-conditioned: SRModel.stage1_vectors) whose answer is the video head for a video-task example
    (is_video [n] True) and the comment head for a comment-task example."""
    logits = torch.stack([(llm * video_head).sum(-1), (llm * comment_head).sum(-1)], -1) / temperature  # [n, 2]
    labels = (~is_video).long()
    return global_mean(F.cross_entropy(logits, labels, reduction="none"))


def in_batch_logits(queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """queries, keys [B, H] (row i of keys is the positive of row i of queries), ids [B] item ids of the
    keys -> logits [B, B]. An off-diagonal key with the same id as the row's own is the same item appearing
    twice in the batch, not a negative: it is masked to -inf."""
    logits = queries @ keys.T / temperature  # [B, B]
    duplicate = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    return logits.masked_fill(duplicate, float("-inf"))


def item_vectors(model: Recommender, kind: str, idx: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """model.<kind>_item_vectors(idx), with the request times ts (broadcastable to idx) for a model with
    time features (SRConfig.time_features): its item vectors include the item's age at that time."""
    fn = model.video_item_vectors if kind == "video" else model.comment_item_vectors
    if has_time_features(model):
        return fn(idx, ts)
    return fn(idx)


def video_loss(model: Recommender, batch: dict[str, torch.Tensor], train_negatives: int) -> torch.Tensor:
    """InfoNCE of the user vector against its target video: negatives are the other targets of the batch
    plus up to `train_negatives` of batch["negatives"] (training puts fresh draws from the alive pool there).

    With time features every candidate is scored at the row's own request time: its age term, its freshness
    score, and an in-batch target published after that time is no candidate of the row (masked out)."""
    target = batch["target"]  # [B]
    user = model.user_video_vector(batch)  # [B, H]
    if has_time_features(model):
        ts = batch["ts"]
        grid = target[None, :].expand(len(target), -1)  # [B, B]: row i's candidates at row i's time
        logits = (user @ model.timeless_item_vectors("video", target).T / model.temperature
                  + model.age_scores("video", user, grid, ts[:, None]))
        future = model.published("video", grid) > ts[:, None]
        duplicate = (target[:, None] == target[None, :]) | future
        logits = logits.masked_fill(duplicate & ~torch.eye(len(target), dtype=torch.bool, device=target.device),
                                    float("-inf"))
    else:
        logits = in_batch_logits(user, model.video_item_vectors(target), target, model.temperature)
    if train_negatives > 0:
        negatives = batch["negatives"][:, :train_negatives]  # [B, K]
        neg_logits = candidate_logits(model, "video", user, negatives, batch.get("ts"))
        drop = (negatives < 0) | (negatives == target[:, None])
        logits = torch.cat([logits, neg_logits.masked_fill(drop, float("-inf"))], 1)  # [B, B + K]
    return F.cross_entropy(logits, torch.arange(len(target), device=target.device))


def candidate_logits(model: Recommender, kind: str, query: torch.Tensor, candidates: torch.Tensor,
                     ts: torch.Tensor | None) -> torch.Tensor:
    """Scores of candidate lists [B, N] for query vectors [B, H] at request times ts [B] (with time features:
    age terms and freshness included), as trainers/scoring.py computes them; padding is not masked here."""
    if not has_time_features(model):
        keys = item_vectors(model, kind, candidates, None)
        return torch.einsum("bh,bnh->bn", query, keys) / model.temperature
    keys = model.timeless_item_vectors(kind, candidates)
    return (torch.einsum("bh,bnh->bn", query, keys) / model.temperature
            + model.age_scores(kind, query, candidates, ts[:, None]))


def comment_loss(model: Recommender, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Softmax over [target, the example's candidate negatives] (padding masked); an example without
    negatives contributes 0."""
    context = model.comment_context_vector(batch, batch["query_video"])  # [B, H]
    candidates = torch.cat([batch["target"][:, None], batch["negatives"]], 1)  # [B, 1 + K]
    logits = candidate_logits(model, "comment", context, candidates, batch.get("ts"))
    logits = logits.masked_fill(candidates < 0, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(candidates), dtype=torch.long, device=candidates.device))


def id_text_loss(model: SRModel, video_idx: torch.Tensor | None, comment_idx: torch.Tensor | None,
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
        # ID rows still at zero (stage 2 from a stage 1 checkpoint starts them there) have no direction
        # to contrast yet; the rec losses move them first.
        keep = ids.detach().norm(dim=-1) > 0
        if int(keep.sum()) < 2:
            continue
        ids, text, idx = ids[keep], text[keep], idx[keep]
        logits = ids @ text.T / temperature
        labels = torch.arange(len(idx), device=idx.device)
        terms.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    return torch.stack(terms).mean() if terms else None
