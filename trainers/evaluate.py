"""Offline evaluation: rank each example's target among its candidates (target + the example's negatives).

    results = evaluate("FEATURES", {"sr_no_align": "CKPT1", "sasrec": "CKPT2"}, split="test")
    print(format_table(results))

results = {"video": {name: metrics}, "comment": {name: metrics}}, metrics as in trainers/metrics.py plus
"skipped" (examples without negatives, which cannot be ranked). Models are scored through
trainers/scoring.Scorer, the code serving uses. The popularity baseline is computed in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from core.contract import SPLITS, TASKS
from features.folder import FeaturesFolder
from trainers.baselines import (
    BLEND_TAUS_H,
    CountsBefore,
    blend_scores,
    popularity_comment_scores,
    popularity_video_scores,
    recency_scores,
    top_level_scores,
    video_train_counts,
)
from trainers.data import collate
from trainers.metrics import METRIC_NAMES, ranking_metrics, ranks_from_scores
from trainers.scoring import Scorer

# fn(task, batch) -> scores [B, 1 + K] of [target, negatives...]; -inf where a negative is padding. Each
# function also carries `max_history`, the history length its model reads (batches are collated to it).
ScoreFn = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]


def _candidates(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([batch["target"][:, None], batch["negatives"]], 1)  # [B, 1 + K]


def scorer_fn(scorer: Scorer) -> ScoreFn:
    def score(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == "video":
            return scorer.video_candidate_scores(batch, _candidates(batch))
        return scorer.comment_scores(batch, batch["query_video"], _candidates(batch))

    score.max_history = scorer.max_history
    return score


def popularity_fn(folder: FeaturesFolder) -> ScoreFn:
    counts = video_train_counts(folder)

    def score(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == "video":
            return popularity_video_scores(counts, _candidates(batch))
        return popularity_comment_scores(batch)

    score.max_history = 1  # histories are not used
    return score


def time_baseline_fns(folder: FeaturesFolder, blend_tau_h: float = 24.0,
                      blend_taus_h: tuple[float, ...] = ()) -> dict[str, ScoreFn]:
    """The time-aware baselines (issue 8): video recency, popularity_at_t, recency_pop_blend; comment newest,
    most_engaged (likes + replies before t), top_level. Video interactions are the video-task examples of
    every split (the used positive events with a history); replies come from comments.parquet.
    blend_taus_h adds one "recency_pop_blend@<tau>" per tau (for tuning, from the same tables)."""
    video_ts = folder.videos(["ts"])["ts"].to_numpy()
    comments = folder.comments(["comment_id", "parent_id", "ts"])
    comment_ts = comments["ts"].to_numpy()
    top_level = comments["parent_id"].is_null().to_numpy(zero_copy_only=False)
    parent_idx = pa_index(comments)
    replies = CountsBefore(parent_idx[parent_idx >= 0], comment_ts[parent_idx >= 0])
    shown = [folder.examples_table("video", s, ["target", "ts"]) for s in SPLITS]
    interactions = CountsBefore(np.concatenate([t["target"].to_numpy() for t in shown]),
                                np.concatenate([t["ts"].to_numpy() for t in shown]))

    def video(fn):
        def score(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            idx = _candidates(batch).numpy()
            return fn(idx, batch["ts"].numpy())
        score.max_history = 1
        return score

    def comment(fn):
        def score(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return fn(_candidates(batch).numpy(), batch)
        score.max_history = 1
        return score

    def engaged(idx, batch):
        likes = torch.cat([batch["target_likes"][:, None], batch["negative_likes"]], 1).numpy()
        return torch.from_numpy(np.where(idx >= 0, likes + replies(idx, batch["ts"].numpy()), -np.inf))

    def blend(tau):
        return video(lambda idx, ts: blend_scores(video_ts, interactions(idx, ts), idx, ts, tau))

    return {
        "video": {
            "recency": video(lambda idx, ts: recency_scores(video_ts, idx)),
            "popularity_at_t": video(lambda idx, ts: torch.from_numpy(
                np.where(idx >= 0, interactions(idx, ts).astype(np.float64), -np.inf))),
            "recency_pop_blend": blend(blend_tau_h),
            **{f"recency_pop_blend@{tau}": blend(tau) for tau in blend_taus_h},
        },
        "comment": {
            "newest": comment(lambda idx, batch: recency_scores(comment_ts, idx)),
            "most_engaged": comment(engaged),
            "top_level": comment(lambda idx, batch: top_level_scores(top_level, comment_ts, idx)),
        },
    }


def pa_index(comments) -> np.ndarray:
    """[C] comment_idx of each comment's parent, -1 for top-level ones (or a parent not in the table)."""
    found = pc.index_in(comments["parent_id"], value_set=comments["comment_id"])
    return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), np.int64)


def tune_blend(folder: FeaturesFolder, max_examples: int = 0) -> float:
    """tau (hours) of recency_pop_blend with the best NDCG@10 on the valid split's video examples."""
    video = time_baseline_fns(folder, blend_taus_h=BLEND_TAUS_H)["video"]
    fns = {name: fn for name, fn in video.items() if name.startswith("recency_pop_blend@")}
    found = evaluate_fns(folder, fns, "valid", max_examples=max_examples, tasks=("video",))["video"]
    best = max(BLEND_TAUS_H, key=lambda tau: (found[f"recency_pop_blend@{tau}"].get("ndcg@10") or 0.0, -tau))
    print(f"evaluate: recency_pop_blend tau tuned on valid: {best} h", flush=True)
    return best


def evaluate_fns(folder: FeaturesFolder, fns: dict[str, ScoreFn], split: str, batch_size: int = 512,
                 max_examples: int = 0, tasks: tuple[str, ...] = TASKS,
                 negatives_column: str = "negatives") -> dict[str, dict[str, dict]]:
    """Rank every example of `split` with every score function; max_examples > 0 caps each task.
    `negatives_column` picks the video task's candidate list (negatives_<protocol>: another protocol)."""
    results: dict[str, dict[str, dict]] = {}
    for task in tasks:
        ranks: dict[str, list[np.ndarray]] = {name: [] for name in fns}
        skipped = seen = 0
        started = time.monotonic()
        for rows in folder.iter_examples(task, split, batch_size, max_examples):
            if task == "video" and negatives_column != "negatives":
                if negatives_column not in rows:
                    raise ValueError(f"{folder}: video examples have no {negatives_column} column "
                                     "(built before candidate protocols; rebuild the features)")
                rows["negatives"] = rows[negatives_column]
            has_negatives = np.array([len(n) > 0 for n in rows["negatives"]])
            seen += len(has_negatives)
            skipped += int((~has_negatives).sum())  # nothing to rank the target against
            if not has_negatives.any():
                continue
            rows = {k: v[has_negatives] for k, v in rows.items()}
            collated: dict[int, dict[str, torch.Tensor]] = {}  # one collate per history length
            for name, fn in fns.items():
                if fn.max_history not in collated:
                    collated[fn.max_history] = collate(rows, fn.max_history)
                batch = collated[fn.max_history]
                scores = fn(task, batch).double().numpy()  # [B, 1 + K]
                valid = (batch["negatives"] >= 0).numpy()
                ranks[name].append(ranks_from_scores(scores[:, 0], scores[:, 1:], valid))
        elapsed = time.monotonic() - started
        print(f"evaluate: {task}/{split}: {seen} examples ({skipped} without negatives skipped), "
              f"{len(fns)} models, {elapsed:.1f}s", flush=True)
        results[task] = {}
        for name in fns:
            metrics = ranking_metrics(np.concatenate(ranks[name]) if ranks[name] else np.zeros(0))
            results[task][name] = {**metrics, "skipped": skipped}
    return results


def evaluate(features: FeaturesFolder | str | Path, checkpoints: dict[str, str | Path], split: str = "test",
             popularity: bool = True, batch_size: int = 512, max_examples: int = 0,
             device: str = "cpu") -> dict:
    """Metrics per task and model for the checkpoints (name -> folder), "popularity" and the time-aware
    baselines, under the build's video protocol ("protocol"); "other_protocols" holds the video task under
    every other protocol the build wrote. {"protocol", "recency_pop_blend_tau_h", "video", "comment",
    "other_protocols": {protocol: {"video": {...}}}}. `features` may be a URI (downloaded once into the cache)."""
    folder = FeaturesFolder.open(features)
    manifest = folder.manifest
    protocol = manifest.get("video_protocol", "uniform_all")
    fns: dict[str, ScoreFn] = {}
    if popularity:
        fns["popularity"] = popularity_fn(folder)
    for name, ckpt in checkpoints.items():
        if name in fns:
            raise ValueError(f"model name {name!r} is used twice")
        fns[name] = scorer_fn(Scorer(ckpt, folder, device=device))
    tau = tune_blend(folder, max_examples)
    baselines = time_baseline_fns(folder, tau)
    results: dict = {"protocol": protocol, "recency_pop_blend_tau_h": tau}
    for task in TASKS:
        task_fns = {**fns, **baselines[task]}
        results.update(evaluate_fns(folder, task_fns, split, batch_size, max_examples, tasks=(task,)))
    results["other_protocols"] = {}
    for other in manifest.get("video_protocols", []):
        if other != protocol:
            results["other_protocols"][other] = evaluate_fns(
                folder, {**fns, **baselines["video"]}, split, batch_size, max_examples, tasks=("video",),
                negatives_column=f"negatives_{other}")
    return results


def _task_blocks(title: str, tasks: dict) -> list[str]:
    columns = ("count", *METRIC_NAMES)
    lines = []
    for task, models in tasks.items():
        width = max([len("model"), *(len(name) for name in models)])
        lines.append(f"{task} task{title}")
        lines.append("  ".join([f"{'model':<{width}}", *(f"{c:>9}" for c in columns)]))
        for name, metrics in models.items():
            cells = [f"{metrics.get('count', 0):>9}"]
            for metric in METRIC_NAMES:
                value = metrics.get(metric)
                cells.append(f"{'-':>9}" if value is None else f"{value:>9.4f}")
            lines.append("  ".join([f"{name:<{width}}", *cells]))
        skipped = max((m.get("skipped", 0) for m in models.values()), default=0)
        if skipped:
            lines.append(f"({skipped} examples without negatives skipped)")
        lines.append("")
    return lines


def format_table(results: dict) -> str:
    """Readable text table: one block per task (and per other video protocol), one row per model."""
    protocol = results.get("protocol")
    lines = []
    if protocol:
        lines.append(f"video candidates: {protocol} (recency_pop_blend tau {results.get('recency_pop_blend_tau_h')} h, "
                     "tuned on valid)")
        lines.append("")
    tasks = {k: v for k, v in results.items() if k in TASKS}
    lines += _task_blocks(f" ({protocol})" if protocol else "", {k: v for k, v in tasks.items() if k == "video"})
    lines += _task_blocks("", {k: v for k, v in tasks.items() if k != "video"})
    for other, other_tasks in results.get("other_protocols", {}).items():
        lines += _task_blocks(f" ({other})", other_tasks)
    return "\n".join(lines).rstrip() + "\n"
