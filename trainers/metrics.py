"""Ranking metrics, pure numpy.

rank = number of valid candidates whose score is >= the target's score (0 = the target is first). Ties are
pessimistic: a candidate that scores exactly like the target counts as ahead of it, so a model that gives
every item the same score (or popularity with many zero counts) cannot look good by luck of ordering.

With 0-based rank r: Recall@k = [r < k], NDCG@k = [r < k] / log2(r + 2) (one relevant item, so the ideal
DCG is 1), MRR@k = [r < k] / (r + 1); each averaged over examples.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10")


def ranks_from_scores(target_scores: np.ndarray, candidate_scores: np.ndarray,
                      valid: np.ndarray | None = None) -> np.ndarray:
    """target_scores [B], candidate_scores [B, N] (the other candidates, not the target), valid [B, N]
    bool (False = padding) -> 0-based ranks [B] int64."""
    target_scores = np.asarray(target_scores, dtype=np.float64)
    candidate_scores = np.asarray(candidate_scores, dtype=np.float64)
    if candidate_scores.ndim != 2 or target_scores.shape != candidate_scores.shape[:1]:
        raise ValueError(f"expected target [B] and candidates [B, N], got {target_scores.shape} and "
                         f"{candidate_scores.shape}")
    ahead = candidate_scores >= target_scores[:, None]
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != candidate_scores.shape:
            raise ValueError(f"valid mask {valid.shape} does not match candidates {candidate_scores.shape}")
        ahead &= valid
    return ahead.sum(axis=1).astype(np.int64)


def ranking_metrics(ranks: np.ndarray) -> dict[str, float | int | None]:
    """0-based ranks [B] -> {"count": B, "recall@1": ..., ..., "mrr@10": ...} (means over examples;
    None when there are no examples)."""
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if len(ranks) == 0:
        return {"count": 0, **{name: None for name in METRIC_NAMES}}
    out: dict[str, float | int | None] = {"count": int(len(ranks))}
    for name in METRIC_NAMES:
        kind, k = name.split("@")
        hit = ranks < int(k)
        if kind == "recall":
            values = hit.astype(np.float64)
        elif kind == "ndcg":
            values = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        else:
            values = np.where(hit, 1.0 / (ranks + 1.0), 0.0)
        out[name] = float(values.mean())
    return out
