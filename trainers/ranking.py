"""Where the target ranked, and the results made from that: per task and model the metrics (mean and standard
deviation over training seeds), the paired difference to a reference model on the same test examples with a
bootstrap confidence interval over test users, the candidate counts, the cold-item / cold-user slices and the
full-corpus video metrics.

A `Ranking` holds one task's ranks on one split for every score function. A trained model evaluated under
several seeds appears once per seed, named "<model>@seed<k>" (seed_name); a baseline or a single run appears
under its own name. The paired difference uses each example's metric averaged over the seeds, so seed noise
shrinks as seeds are added and user noise is what the interval shows.

    results = results_of(rankings, reference="sr_no_align")   # rankings: trainers/evaluate.rank_all's output
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainers.baselines import NAMES as BASELINES
from trainers.metrics import METRIC_NAMES, metric_values, paired_bootstrap, ranking_metrics

PAIRED_METRIC = "ndcg@10"
BASELINE_NAMES = {name for names in BASELINES.values() for name in names}
FULL_CORPUS_METRICS = ("recall@10", "recall@50", "ndcg@10")
# Stage 1 with the rec losses alone (no LLM): whatever LSVCR gains over the reference, it must also gain over
# this control for the gain to be the LLM's (issue 18), so every model is paired with it too.
STAGE1_CONTROL = "sr_rec_pretrain"

SLICES = ("cold_item", "cold_user", "rest")
COLD_ITEM_AGE_MS = 24 * 3_600_000  # a target published less than this before the event is a cold item
COLD_USER_EVENTS = 3  # a user with at most this many earlier interactions (history elements) is a cold user


@dataclass
class Ranking:
    """One task's evaluation on one split: per example, its user, its number of candidates (target
    included) and its slice; per score function, the target's 0-based rank [N] and the examples whose scores
    were not finite."""

    task: str
    user_id: np.ndarray  # [N] object
    candidates: np.ndarray  # [N] int
    slices: dict[str, np.ndarray]  # slice name -> bool [N]
    ranks: dict[str, np.ndarray]  # score function -> int [N]
    nonfinite: dict[str, int]
    skipped: int  # examples without any negative: nothing to rank the target against

    def metrics(self, name: str) -> dict:
        return {**ranking_metrics(self.ranks[name]), "skipped": self.skipped, "nonfinite": self.nonfinite[name]}

    def candidate_counts(self) -> dict:
        c = self.candidates
        return {"min": int(c.min()), "median": float(np.median(c)), "max": int(c.max())} if len(c) else {}


def cold_slices(rows: dict, task: str, item_ts: np.ndarray, trained: np.ndarray) -> dict[str, np.ndarray]:
    """Slice masks of a batch of example rows: cold_item (the target was published less than
    COLD_ITEM_AGE_MS before the event, or is not the target of any train example: trained [items] bool),
    cold_user (at most COLD_USER_EVENTS history elements, video and comment records together), rest."""
    target = np.asarray(rows["target"], np.int64)
    age = np.asarray(rows["ts"], np.int64) - np.asarray(item_ts)[target]
    cold_item = (age < COLD_ITEM_AGE_MS) | ~np.asarray(trained)[target]
    earlier = np.array([len(v) + len(c) for v, c in zip(rows["hist_video"], rows["hist_cmt_video"])])
    cold_user = earlier <= COLD_USER_EVENTS
    return {"cold_item": cold_item, "cold_user": cold_user, "rest": ~cold_item & ~cold_user}


def alive_pools(lo: np.ndarray, hi: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
    """Every video alive at each example's time (item indices lo..hi-1) other than its target: the full-corpus
    candidates of the video task (the alive pool without sampling)."""
    return [np.setdiff1d(np.arange(a, b), [t]) for a, b, t in zip(lo, hi, np.asarray(target))]


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
        out[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None  # one run: not measured
    return out


def task_results(ranking: Ranking, metrics: tuple[str, ...] = METRIC_NAMES, mask: np.ndarray | None = None) -> dict:
    """{model: mean and std over its seeds of each metric, count, seeds, nonfinite, skipped} (baselines and
    single runs: their one run, std None)."""
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
        out[model]["skipped"] = ranking.skipped
    return out


def paired(ranking: Ranking, references: list[str], metric: str = PAIRED_METRIC, n_boot: int = 1000,
           seed: int = 0) -> dict:
    """{model: {reference: {"diff", "ci95", "significant", ...}}}: each model's seed-averaged per-example
    `metric` minus each evaluated reference's, intervals resampling test users."""
    groups = _by_model(ranking.ranks)
    values = {model: np.mean([metric_values(ranking.ranks[n], metric) for n in names], axis=0)
              for model, names in groups.items()}
    out: dict = {}
    for ref in (r for r in references if r in groups):
        for model in groups:
            if model != ref:
                out.setdefault(model, {})[ref] = paired_bootstrap(values[model], values[ref], ranking.user_id,
                                                                  n_boot, seed)
    return out


def beats_every_baseline(paired_task: dict, model: str) -> bool | None:
    """Whether `model`'s paired NDCG@10 intervals against every baseline of the task lie above 0 (None when
    it was compared with none)."""
    against = {ref: d for ref, d in paired_task.get(model, {}).items()
               if model_of(ref) in BASELINE_NAMES and d["diff"] is not None}
    if not against:
        return None
    return all(d["ci95"][0] > 0 for d in against.values())


def verdict(interval: dict) -> str:
    """How tables word a paired difference: significant only when its 95% interval excludes 0."""
    return "significant" if interval["significant"] else "not significant (interval contains 0)"


def results_of(rankings: dict[str, Ranking], reference: str = "sr_no_align", n_boot: int = 1000) -> dict:
    """{task: {model: metrics}} (task_results), "candidates", "slices": {task: {slice: {model: metrics}}},
    "paired": {task: {model: {reference: {"diff", "ci95", "significant", ...}}}} on NDCG@10 against the
    reference and STAGE1_CONTROL (when evaluated) and against every baseline of the task, and, with a
    "full_corpus/video" ranking, "full_corpus": {"video": {...}}."""
    tasks = [t for t in rankings if "/" not in t]
    out: dict = {task: task_results(rankings[task]) for task in tasks}
    out["candidates"] = {task: rankings[task].candidate_counts() for task in tasks}
    out["slices"] = {task: {s: task_results(rankings[task], mask=rankings[task].slices[s]) for s in SLICES}
                     for task in tasks}
    out["paired"] = {}
    for task in tasks:
        # Against the reference model, the stage 1 control and every baseline, the strongest first (the bar
        # any model must clear); the text tables show the controls and the strongest baseline.
        scored = {name: out[task][name]["ndcg@10"] for name in BASELINES.get(task, ())
                  if out[task].get(name, {}).get("ndcg@10") is not None}
        # (paired skips any of them that was not evaluated)
        against = list(dict.fromkeys([reference, STAGE1_CONTROL, *sorted(scored, key=scored.get, reverse=True)]))
        out["paired"][task] = paired(rankings[task], against, n_boot=n_boot)
    if "full_corpus/video" in rankings:
        full = rankings["full_corpus/video"]
        out["full_corpus"] = {"video": task_results(full, FULL_CORPUS_METRICS)}
        out["candidates"]["full_corpus/video"] = full.candidate_counts()
    return out
