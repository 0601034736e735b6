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
from trainers.data import collate, object_column, user_video_positives, without_later_positives
from trainers.metrics import METRIC_NAMES, nonfinite_examples, ranks_from_scores
from trainers.ranking import (
    BASELINE_NAMES,
    COLD_USER_EVENTS,
    FULL_CORPUS_METRICS,
    SLICES,
    STAGE1_CONTROL,
    Ranking,
    alive_pools,
    beats_every_baseline,
    cold_slices,
    results_of,
    task_results,
    verdict,
)
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


def rank_task(folder: FeaturesFolder, fns: dict[str, ScoreFn], task: str, split: str, batch_size: int = 512,
              max_examples: int = 0, negatives_column: str = "negatives", full_corpus: bool = False) -> Ranking:
    """Rank every example of one task and split with every score function (max_examples > 0 caps it).
    `negatives_column` picks the video task's candidate list (negatives_<protocol>: another protocol);
    full_corpus ranks video targets among every video alive then instead (FeaturesFolder.alive_bounds)."""
    video_ts, comment_ts = folder.item_times()
    item_ts = video_ts if task == "video" else comment_ts
    trained = np.zeros(len(item_ts), bool)
    trained[folder.examples_table(task, "train", ["target"])["target"].to_numpy()] = True
    # A comment the user also engaged with under that video is not a negative (later ones: known per split).
    positives = user_video_positives(folder, SPLITS) if task == "comment" else None
    parts: dict[str, list] = {"user_id": [], "candidates": [], **{s: [] for s in SLICES}}
    ranks: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    nonfinite = dict.fromkeys(fns, 0)
    skipped = seen = 0
    started = time.monotonic()
    for rows in folder.iter_examples(task, split, batch_size, max_examples):
        if full_corpus:
            rows["negatives"] = object_column(alive_pools(*folder.alive_bounds(rows["ts"]), rows["target"]))
        elif positives is not None:
            rows = without_later_positives(rows, positives)
        elif task == "video" and negatives_column != "negatives":
            if negatives_column not in rows:
                raise ValueError(f"{folder}: video examples have no {negatives_column} column "
                                 "(built before candidate protocols; rebuild the features)")
            rows["negatives"] = rows[negatives_column]
        has_negatives = np.array([len(n) > 0 for n in rows["negatives"]])
        seen += len(has_negatives)
        skipped += int((~has_negatives).sum())
        if not has_negatives.any():
            continue
        rows = {k: v[has_negatives] for k, v in rows.items()}
        parts["user_id"].append(rows["user_id"])
        parts["candidates"].append(np.array([1 + len(n) for n in rows["negatives"]]))
        for name, mask in cold_slices(rows, task, item_ts, trained).items():
            parts[name].append(mask)
        collated: dict[int, dict[str, torch.Tensor]] = {}  # one collate per history length
        for name, fn in fns.items():
            if fn.max_history not in collated:
                collated[fn.max_history] = collate(rows, fn.max_history)
            batch = collated[fn.max_history]
            scores = fn(task, batch).double().numpy()  # [B, 1 + K]
            valid = (batch["negatives"] >= 0).numpy()
            ranks[name].append(ranks_from_scores(scores[:, 0], scores[:, 1:], valid))
            nonfinite[name] += nonfinite_examples(scores[:, 0], scores[:, 1:], valid)
    print(f"evaluate: {task}/{split}{' (full corpus)' if full_corpus else ''}: {seen} examples "
          f"({skipped} without negatives skipped), {len(fns)} models, {time.monotonic() - started:.1f}s", flush=True)

    def joined(values: list, dtype) -> np.ndarray:
        return np.concatenate(values) if values else np.zeros(0, dtype)

    return Ranking(task=task, user_id=joined(parts["user_id"], object),
                   candidates=joined(parts["candidates"], np.int64),
                   slices={s: joined(parts[s], bool) for s in SLICES},
                   ranks={name: joined(r, np.int64) for name, r in ranks.items()},
                   nonfinite=nonfinite, skipped=skipped)


def evaluate_fns(folder: FeaturesFolder, fns: dict[str, ScoreFn], split: str, batch_size: int = 512,
                 max_examples: int = 0, tasks: tuple[str, ...] = TASKS,
                 negatives_column: str = "negatives") -> dict[str, dict[str, dict]]:
    """Metrics of every score function on every example of `split`: {task: {name: metrics}}."""
    out = {}
    for task in tasks:
        ranking = rank_task(folder, fns, task, split, batch_size, max_examples, negatives_column)
        out[task] = {name: ranking.metrics(name) for name in fns}
    return out


def tables_of(folder: FeaturesFolder, tables: dict[str, FeaturesFolder | str | Path] | None,
              name: str) -> FeaturesFolder:
    """The folder whose item tables checkpoint `name` reads: its entry in `tables` (see score_fns), once that is
    known to hold the examples of `folder` (the same cut, split and catalogs), else `folder` itself."""
    if name not in (tables or {}):
        return folder
    other = FeaturesFolder.open(tables[name])
    keys = ("cut_ts", "split_policy", "num_videos", "num_comments")
    differ = [k for k in keys if folder.manifest.get(k) != other.manifest.get(k)]
    if differ or (folder.num_videos, folder.num_comments) != (other.num_videos, other.num_comments):
        raise ValueError(f"{other} does not hold the examples of {folder} (its {differ or 'tables'} differ)")
    return other


FULL_CORPUS_BATCH = 64  # examples per full-corpus batch: [B, pool, H] item vectors are gathered at once


def score_fns(folder: FeaturesFolder, checkpoints: dict[str, str | Path], popularity: bool = True,
              device: str = "cpu", max_examples: int = 0,
              tables: dict[str, FeaturesFolder | str | Path] | None = None) -> tuple[dict[str, dict[str, ScoreFn]], float]:
    """Per task, every score function evaluation compares: the checkpoints (name -> folder), "popularity" and
    the time-aware baselines (recency_pop_blend's tau tuned on valid, returned too). `tables` (name -> features
    folder) gives a checkpoint trained over other item tables of the same examples (features/reembed.py, or a
    build of the same event log with another encoder) the tables it reads."""
    fns: dict[str, ScoreFn] = {}
    if popularity:
        fns["popularity"] = popularity_fn(folder)
    unknown = sorted(set(tables or {}) - set(checkpoints))
    if unknown:
        raise ValueError(f"tables for {unknown}, which are not among the checkpoints")
    for name, ckpt in checkpoints.items():
        if name in fns:
            raise ValueError(f"model name {name!r} is used twice")
        own = tables_of(folder, tables, name)
        fns[name] = scorer_fn(Scorer(ckpt, own, device=device))
    tau = tune_blend(folder, max_examples)
    baselines = time_baseline_fns(folder, tau)
    return {task: {**fns, **baselines[task]} for task in TASKS}, tau


def rank_all(folder: FeaturesFolder, fns: dict[str, dict[str, ScoreFn]], split: str, batch_size: int = 512,
             max_examples: int = 0) -> dict[str, Ranking]:
    """Rankings of both tasks under the build's candidates, and of the video task against the whole alive
    pool ("full_corpus/video")."""
    out = {task: rank_task(folder, fns[task], task, split, batch_size, max_examples) for task in TASKS}
    out["full_corpus/video"] = rank_task(folder, fns["video"], "video", split, FULL_CORPUS_BATCH, max_examples,
                                         full_corpus=True)
    return out


def evaluate(features: FeaturesFolder | str | Path, checkpoints: dict[str, str | Path], split: str = "test",
             popularity: bool = True, batch_size: int = 512, max_examples: int = 0,
             device: str = "cpu", reference: str = "sr_no_align",
             tables: dict[str, FeaturesFolder | str | Path] | None = None) -> dict:
    """Metrics per task and model for the checkpoints (name -> folder; "<model>@seed<k>" for one seed of
    several), "popularity" and the time-aware baselines, under the build's video protocol: means and standard
    deviations over seeds, paired differences to `reference`, candidate counts, cold-item / cold-user slices
    and full-corpus video metrics (trainers/ranking.results_of); "other_protocols" holds the video task under
    every other protocol the build wrote. `features` may be a URI (downloaded once into the cache). `tables`:
    see score_fns."""
    folder = FeaturesFolder.open(features)
    manifest = folder.manifest
    fns, tau = score_fns(folder, checkpoints, popularity, device, max_examples, tables)
    results: dict = {"split": split, "protocol": manifest.get("video_protocol", "uniform_all"),
                     "recency_pop_blend_tau_h": tau, "alive_window_ms": manifest.get("alive_window_ms", 0),
                     **results_of(rank_all(folder, fns, split, batch_size, max_examples), reference)}
    results["other_protocols"] = {}
    for other in manifest.get("video_protocols", []):
        if other != results["protocol"]:
            ranking = rank_task(folder, fns["video"], "video", split, batch_size, max_examples,
                                negatives_column=f"negatives_{other}")
            results["other_protocols"][other] = {"video": task_results(ranking)}  # seeds merged as above
    return results


def without_age_terms(features: FeaturesFolder | str | Path, checkpoints: dict[str, str | Path],
                      split: str = "test", batch_size: int = 512, max_examples: int = 0,
                      device: str = "cpu", tables: dict[str, FeaturesFolder | str | Path] | None = None,
                      ) -> dict[str, dict[str, float | None]]:
    """{task: {model: NDCG@10 (mean over seeds)}} of the checkpoints with time features, scored with their
    item-age terms zeroed (Scorer age_terms=False) on the build's candidates: set beside the full scores, how
    much of each model's ranking its age terms carry. Models without time features are left out. `tables`: see
    score_fns."""
    folder = FeaturesFolder.open(features)
    fns = {}
    for name, ckpt in checkpoints.items():
        own = tables_of(folder, tables, name)
        scorer = Scorer(ckpt, own, device=device, age_terms=False)
        if scorer.time_features:
            fns[name] = scorer_fn(scorer)
    if not fns:
        return {}
    return {task: {model: m["ndcg@10"] for model, m in
                   task_results(rank_task(folder, fns, task, split, batch_size, max_examples)).items()}
            for task in TASKS}


def _cell(value, width: int = 9) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def _task_blocks(title: str, tasks: dict) -> list[str]:
    """One row per model; with several seeds, the mean over seeds and the standard deviation of NDCG@10."""
    lines = []
    for task, models in tasks.items():
        width = max([len("model"), *(len(name) for name in models)])
        seeded = any(m.get("seeds", 1) > 1 for m in models.values())
        extra = ("seeds", "ndcg@10_std") if seeded else ()
        lines.append(f"{task} task{title}{' (means over seeds)' if seeded else ''}")
        lines.append("  ".join([f"{'model':<{width}}", *(f"{c[:9]:>9}" for c in ("count", *METRIC_NAMES)),
                                *(f"{c:>11}" for c in extra)]))
        for name, metrics in models.items():
            cells = [f"{metrics.get('count', 0):>9}", *(_cell(metrics.get(m)) for m in METRIC_NAMES)]
            if seeded:
                cells += [f"{metrics.get('seeds', 1):>11}", _cell(metrics.get("ndcg@10_std"), 11)]
            lines.append("  ".join([f"{name:<{width}}", *cells]))
        skipped = max((m.get("skipped", 0) for m in models.values()), default=0)
        if skipped:
            lines.append(f"({skipped} examples without negatives skipped)")
        broken = {name: m["nonfinite"] for name, m in models.items() if m.get("nonfinite")}
        if broken:
            lines.append(f"(examples with a NaN or infinite score, ranked last: {broken})")
        lines.append("")
    return lines


def _full_corpus_block(results: dict) -> list[str]:
    models = results.get("full_corpus", {}).get("video", {})
    if not models:
        return []
    width = max([len("model"), *(len(name) for name in models)])
    hours = results.get("alive_window_ms", 0) / 3.6e6
    pool = f"published in the {hours:.1f} h before the event" if hours else "alive in the event's own window"
    lines = [f"video task, full corpus (every video {pool})",
             "  ".join([f"{'model':<{width}}", f"{'count':>9}", *(f"{m:>9}" for m in FULL_CORPUS_METRICS)])]
    for name, metrics in models.items():
        lines.append("  ".join([f"{name:<{width}}", f"{metrics['count']:>9}",
                                *(_cell(metrics[m]) for m in FULL_CORPUS_METRICS)]))
    return lines + [""]


def _paired_blocks(results: dict) -> list[str]:
    """The controls (the reference, and the stage 1 control when evaluated) and the strongest baseline in full,
    then which models lie above every baseline."""
    lines = []
    for task, models in results.get("paired", {}).items():
        references = list(dict.fromkeys(ref for by_ref in models.values() for ref in by_ref))
        shown = 3 if STAGE1_CONTROL in references else 2
        for ref in references[:shown]:
            rows = [(name, by_ref[ref]) for name, by_ref in models.items()
                    if ref in by_ref and by_ref[ref]["diff"] is not None]
            if not rows:
                continue
            width = max([len("model"), *(len(name) for name, _ in rows)])
            lines.append(f"{task} task: NDCG@10 minus {ref}'s on the same test examples, 95% bootstrap "
                         f"interval over {rows[0][1]['groups']} test users")
            lines.append("  ".join([f"{'model':<{width}}", f"{'diff':>9}", f"{'ci95':>20}"]))
            for name, d in rows:
                low, high = d["ci95"]
                lines.append("  ".join([f"{name:<{width}}", f"{d['diff']:>+9.4f}", f"[{low:+.4f}, {high:+.4f}]",
                                        verdict(d)]))
            lines.append("")
        above = {name: beats_every_baseline(models, name) for name in models if name not in BASELINE_NAMES}
        above = {name: value for name, value in above.items() if value is not None}
        if above:
            lines.append(f"{task} task: above every baseline (each paired interval > 0): "
                         + ", ".join(f"{name} {'yes' if value else 'no'}" for name, value in above.items()))
            lines.append("")
    return lines


def _slice_blocks(results: dict, metric: str = "ndcg@10") -> list[str]:
    lines = []
    for task, slices in results.get("slices", {}).items():
        models = list(next(iter(slices.values()), {}))
        if not models:
            continue
        width = max([len("model"), *(len(name) for name in models)])
        counts = {s: next(iter(slices[s].values()))["count"] for s in SLICES}
        lines.append(f"{task} task {metric} by slice (cold item: published < 24 h before or never a train target; "
                     f"cold user: <= {COLD_USER_EVENTS} earlier interactions)")
        lines.append("  ".join([f"{'model':<{width}}", *(f"{f'{s} ({counts[s]})':>18}" for s in SLICES)]))
        for name in models:
            lines.append("  ".join([f"{name:<{width}}", *(_cell(slices[s][name][metric], 18) for s in SLICES)]))
        lines.append("")
    return lines


def format_table(results: dict) -> str:
    """Readable text table: one block per task (and per other video protocol), one row per model, then the
    paired differences to the reference, the full-corpus video metrics and the slices."""
    protocol = results.get("protocol")
    lines = []
    if protocol:
        lines.append(f"video candidates: {protocol} (recency_pop_blend tau {results.get('recency_pop_blend_tau_h')} h, "
                     "tuned on valid)")
    counts = results.get("candidates", {})
    if counts:
        lines.append("candidates per example, target included (min / median / max): " + ", ".join(
            f"{task} {c['min']} / {c['median']:g} / {c['max']}" for task, c in counts.items() if c))
    if lines:
        lines.append("")
    tasks = {k: v for k, v in results.items() if k in TASKS}
    lines += _task_blocks(f" ({protocol})" if protocol else "", {k: v for k, v in tasks.items() if k == "video"})
    lines += _task_blocks("", {k: v for k, v in tasks.items() if k != "video"})
    lines += _paired_blocks(results)
    lines += _full_corpus_block(results)
    lines += _slice_blocks(results)
    for other, other_tasks in results.get("other_protocols", {}).items():
        lines += _task_blocks(f" ({other})", other_tasks)
    return "\n".join(lines).rstrip() + "\n"
