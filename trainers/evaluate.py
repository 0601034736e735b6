"""Offline evaluation: rank each example's target among its candidates (target + the example's negatives).

    results = evaluate("FEATURES", {"sr_no_align": "CKPT1", "sasrec": "CKPT2"}, split="test")
    print(format_table(results))

results = {"video": {name: metrics}, "comment": {name: metrics}}, metrics as in trainers/metrics.py plus
"skipped" (examples without negatives, which cannot be ranked). Models are scored through
trainers/scoring.Scorer, the code serving uses. The popularity baseline is computed in the same run.

    python -m trainers.evaluate FEATURES sr_no_align=CKPT sasrec=CKPT [--split test]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainers.baselines import popularity_comment_scores, popularity_video_scores, video_train_counts
from trainers.data import TASKS, collate, iter_examples, load_text_tables
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


def popularity_fn(features_dir: str | Path) -> ScoreFn:
    num_videos = load_text_tables(features_dir)[0].shape[0]
    counts = video_train_counts(features_dir, num_videos)

    def score(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == "video":
            return popularity_video_scores(counts, _candidates(batch))
        return popularity_comment_scores(batch)

    score.max_history = 1  # histories are not used
    return score


def evaluate_fns(features_dir: str | Path, fns: dict[str, ScoreFn], split: str, batch_size: int = 512,
                 max_examples: int = 0, tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, dict]]:
    """Rank every example of `split` with every score function; max_examples > 0 caps each task."""
    results: dict[str, dict[str, dict]] = {}
    for task in tasks:
        ranks: dict[str, list[np.ndarray]] = {name: [] for name in fns}
        skipped = seen = 0
        started = time.monotonic()
        for rows in iter_examples(features_dir, task, split, batch_size, max_examples):
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


def evaluate(features_dir: str | Path, checkpoints: dict[str, str | Path], split: str = "test",
             popularity: bool = True, batch_size: int = 512, max_examples: int = 0,
             device: str = "cpu") -> dict[str, dict[str, dict]]:
    """Metrics per task and model for the given checkpoints (name -> folder) plus "popularity"."""
    fns: dict[str, ScoreFn] = {}
    if popularity:
        fns["popularity"] = popularity_fn(features_dir)
    for name, ckpt in checkpoints.items():
        if name in fns:
            raise ValueError(f"model name {name!r} is used twice")
        fns[name] = scorer_fn(Scorer(ckpt, features_dir, device=device))
    return evaluate_fns(features_dir, fns, split, batch_size, max_examples)


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """Readable text table: one block per task, one row per model."""
    columns = ("count", *METRIC_NAMES)
    lines = []
    for task, models in results.items():
        width = max([len("model"), *(len(name) for name in models)])
        lines.append(f"{task} task")
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
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate checkpoints and the popularity baseline.")
    parser.add_argument("features")
    parser.add_argument("models", nargs="*", help="NAME=CHECKPOINT_DIR")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--max-examples", type=int, default=0)
    args = parser.parse_args(argv)
    checkpoints = {}
    for item in args.models:
        if "=" not in item:
            parser.error(f"{item!r} is not NAME=CHECKPOINT_DIR")
        name, path = item.split("=", 1)
        checkpoints[name] = path
    print(format_table(evaluate(args.features, checkpoints, args.split, max_examples=args.max_examples)))


if __name__ == "__main__":
    main()
