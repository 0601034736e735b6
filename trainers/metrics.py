"""Ranking metrics, pure numpy.

rank = number of valid candidates whose score is >= the target's score (0 = the target is first). Ties are
pessimistic: a candidate that scores exactly like the target counts as ahead of it, so a model that gives
every item the same score (or popularity with many zero counts) cannot look good by luck of ordering. A NaN or
infinite score ranks last (below every finite one; a non-finite target is behind every valid candidate), so
a broken score can never flatter; `nonfinite_examples` counts the examples that had one.

With 0-based rank r: Recall@k = [r < k], NDCG@k = [r < k] / log2(r + 2) (one relevant item, so the ideal
DCG is 1), MRR@k = [r < k] / (r + 1); each averaged over examples.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10")


def _last_if_not_finite(scores: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(scores), scores, -np.inf)


def ranks_from_scores(target_scores: np.ndarray, candidate_scores: np.ndarray,
                      valid: np.ndarray | None = None) -> np.ndarray:
    """target_scores [B], candidate_scores [B, N] (the other candidates, not the target), valid [B, N]
    bool (False = padding) -> 0-based ranks [B] int64."""
    target_scores = np.asarray(target_scores, dtype=np.float64)
    candidate_scores = np.asarray(candidate_scores, dtype=np.float64)
    if candidate_scores.ndim != 2 or target_scores.shape != candidate_scores.shape[:1]:
        raise ValueError(f"expected target [B] and candidates [B, N], got {target_scores.shape} and "
                         f"{candidate_scores.shape}")
    ahead = _last_if_not_finite(candidate_scores) >= _last_if_not_finite(target_scores)[:, None]
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
        out[name] = float(metric_values(ranks, name).mean())
    return out


def nonfinite_examples(target_scores: np.ndarray, candidate_scores: np.ndarray,
                       valid: np.ndarray | None = None) -> int:
    """How many examples have a NaN or infinite score on the target or on a valid candidate."""
    bad = ~np.isfinite(np.asarray(candidate_scores, dtype=np.float64))
    if valid is not None:
        bad &= np.asarray(valid, dtype=bool)
    return int((bad.any(axis=1) | ~np.isfinite(np.asarray(target_scores, dtype=np.float64))).sum())


def metric_values(ranks: np.ndarray, name: str) -> np.ndarray:
    """Per-example values [B] of one metric (e.g. "ndcg@10") for 0-based ranks [B]; their mean is the metric."""
    kind, k = name.split("@")
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
    hit = ranks < int(k)
    if kind == "recall":
        return hit.astype(np.float64)
    if kind == "ndcg":
        return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    if kind == "mrr":
        return np.where(hit, 1.0 / (ranks + 1.0), 0.0)
    raise ValueError(f"unknown metric {name!r}")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of a - b over paired examples, with a bootstrap confidence interval that resamples whole groups
    (test users: one user's examples are not independent). Returns {"diff", "ci95": [low, high],
    "significant": the interval excludes 0, "examples", "groups"}."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.shape != np.shape(groups):
        raise ValueError(f"a, b and groups must have one value per example: {a.shape}, {b.shape}, "
                         f"{np.shape(groups)}")
    if len(a) == 0:
        return {"diff": None, "ci95": [None, None], "significant": False, "examples": 0, "groups": 0}
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group.max()) + 1
    sums = np.bincount(group, weights=a - b, minlength=n_groups)  # [U]
    counts = np.bincount(group, minlength=n_groups).astype(np.float64)  # [U]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)  # [n_boot, U]
    diffs = (weights @ sums) / (weights @ counts)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"diff": float((a - b).mean()), "ci95": [float(low), float(high)],
            "significant": bool(low > 0 or high < 0), "examples": int(len(a)), "groups": n_groups}
