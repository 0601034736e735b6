"""Results over several training seeds: each model's mean and standard deviation, and its paired difference to
a reference model on the same test examples with a bootstrap confidence interval over test users.

A trained model evaluated under several seeds appears in a Ranking once per seed, named "<model>@seed<k>";
baselines appear once under their own name (they have no seed). The paired difference uses each example's
metric averaged over the seeds, so seed noise shrinks as seeds are added and user noise is in the interval.

    results = seed_results(rankings, reference="sr_no_align")   # rankings: rank_all's output
"""

from __future__ import annotations

import numpy as np

from trainers.evaluate import FULL_CORPUS_METRICS, SLICES, Ranking
from trainers.metrics import METRIC_NAMES, metric_values, paired_bootstrap, ranking_metrics

PAIRED_METRIC = "ndcg@10"


def seed_name(model: str, seed: int) -> str:
    return f"{model}@seed{seed}"


def model_of(name: str) -> str:
    return name.split("@seed", 1)[0]


def _by_model(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(model_of(name), []).append(name)
    return out


def _mean_std(per_seed: list[dict], metrics: tuple[str, ...]) -> dict:
    out: dict = {"count": per_seed[0]["count"], "seeds": len(per_seed)}
    for m in metrics:
        values = [r[m] for r in per_seed if r.get(m) is not None]
        out[m] = float(np.mean(values)) if values else None
        out[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0 if values else None
    return out


def task_results(ranking: Ranking, metrics: tuple[str, ...] = METRIC_NAMES, mask: np.ndarray | None = None) -> dict:
    """{model: mean and std over its seeds of each metric} (baselines: their one run)."""
    out = {}
    for model, names in _by_model(ranking.ranks).items():
        per_seed = []
        for name in names:
            ranks = ranking.ranks[name] if mask is None else ranking.ranks[name][mask]
            found = ranking_metrics(ranks)
            found.update({m: float(metric_values(ranks, m).mean()) if len(ranks) else None
                          for m in metrics if m not in found})
            per_seed.append(found)
        out[model] = _mean_std(per_seed, metrics)
        out[model]["nonfinite"] = sum(ranking.nonfinite[name] for name in names)
    return out


def paired(ranking: Ranking, reference: str, metric: str = PAIRED_METRIC, n_boot: int = 1000,
           seed: int = 0) -> dict:
    """{model: {reference: {"diff", "ci95", "significant", ...}}}: each model's seed-averaged per-example
    `metric` minus the reference's, intervals resampling test users."""
    groups = _by_model(ranking.ranks)
    if reference not in groups:
        return {}
    values = {model: np.mean([metric_values(ranking.ranks[n], metric) for n in names], axis=0)
              for model, names in groups.items()}
    return {model: {reference: paired_bootstrap(values[model], values[reference], ranking.user_id, n_boot, seed)}
            for model in groups if model != reference}


def seed_results(rankings: dict[str, Ranking], reference: str = "sr_no_align", n_boot: int = 1000) -> dict:
    """Results in the shape of evaluate.results_of, each metric the mean over seeds with a "<metric>_std"
    beside it, plus "paired": {task: {model: {reference: interval}}} on NDCG@10."""
    tasks = [t for t in rankings if "/" not in t]
    out: dict = {task: task_results(rankings[task]) for task in tasks}
    out["candidates"] = {task: rankings[task].candidate_counts() for task in tasks}
    out["slices"] = {task: {s: task_results(rankings[task], mask=rankings[task].slices[s]) for s in SLICES}
                     for task in tasks}
    out["paired"] = {task: paired(rankings[task], reference, n_boot=n_boot) for task in tasks}
    if "full_corpus/video" in rankings:
        full = rankings["full_corpus/video"]
        out["full_corpus"] = {"video": task_results(full, FULL_CORPUS_METRICS)}
        out["candidates"]["full_corpus/video"] = full.candidate_counts()
    return out
