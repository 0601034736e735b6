"""`lsvcr report RUN_DIR`: a Markdown metrics table and PNG training curves for one suite run.

    path = report("RUN")   # -> RUN/.../report.md, next to the metrics.json it read
    lsvcr report RUN [--out FOLDER]

RUN_DIR is the suite's output folder (holding metrics.json, lsvcr/suite.py), or a `lsvcr run` work folder
(metrics.json under models/), or a metrics.json file itself. Everything that metrics.json holds besides the
per-task metrics (split, protocol, ...) is listed above the tables, so new keys show up without code changes;
any model or baseline under a task gets a row, and every numeric metric a column.

Curves come from each checkpoint's train.json `history` (one record per epoch): stage 2 loss and valid
NDCG@5 per epoch, and the stage 1 loss per epoch of the `<name>_aligned` folders next to the checkpoints.
matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.contract import TASKS
from trainers.metrics import METRIC_NAMES
from trainers.ranking import verdict

SKIP_KEYS = ("metrics", "checkpoints")
# (file stem, title, stage, history key)
CURVES = (("curve_loss", "stage 2 train loss", "finetune", "loss"),
          ("curve_valid_ndcg5", "stage 2 valid NDCG@5", "finetune", "valid_ndcg@5"),
          ("curve_align_loss", "stage 1 train loss", "align", "total_loss"))


def find_metrics(run_dir: str | Path) -> Path:
    """The metrics.json of a run folder (RUN/metrics.json or RUN/models/metrics.json) or the file itself."""
    path = Path(run_dir)
    for candidate in (path, path / "metrics.json", path / "models" / "metrics.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{run_dir}: no metrics.json (looked in the folder and in its models/ subfolder)")


def split_result(data: dict) -> tuple[dict, dict]:
    """(per-task metrics {task: {model: {...}}}, everything else) from a metrics.json object. Accepts the
    suite's {"metrics": ..., ...} and the bare {"video": ..., "comment": ...} of `lsvcr run --results`."""
    if not isinstance(data, dict):
        raise ValueError("metrics.json must hold a JSON object")
    if isinstance(data.get("metrics"), dict):
        metrics, rest = data["metrics"], {k: v for k, v in data.items() if k not in SKIP_KEYS}
    else:
        metrics = {k: v for k, v in data.items() if k in TASKS}
        rest = {k: v for k, v in data.items() if k not in TASKS and k not in SKIP_KEYS}
    tasks = {task: models for task, models in metrics.items() if isinstance(models, dict)}
    if not tasks:
        raise ValueError("metrics.json holds no per-task metrics ({'video': {MODEL: {...}}, ...})")
    return tasks, rest


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(models: dict[str, dict]) -> str:
    """One Markdown table: a row per model, the columns `count`, METRIC_NAMES, then any other numeric
    metric (sorted). Non-numeric values (nested dicts, strings) are left out of the table."""
    present = {k for metrics in models.values() if isinstance(metrics, dict)
               for k, v in metrics.items() if _is_number(v) or v is None}
    columns = [c for c in ("count", *METRIC_NAMES) if c in present]
    columns += sorted(present - set(columns))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in models.items():
        metrics = metrics if isinstance(metrics, dict) else {}
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _describe(value) -> str:
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, separators=(", ", ": "), sort_keys=True) + "`"
    return str(value)


def histories(checkpoints: dict[str, str], base: Path) -> dict[str, dict[str, list[dict]]]:
    """{"finetune": {model: history}, "align": {model: history}} from the train.json files. A checkpoint path
    that no longer exists is looked up by name under `base` (the folder of metrics.json)."""
    found = {"finetune": {}, "align": {}}
    for name, folder in checkpoints.items():
        folder = Path(folder)
        if not folder.is_dir():
            folder = base / name
        for stage, path in (("finetune", folder), ("align", folder.parent / f"{name}_aligned")):
            train = path / "train.json"
            if not train.is_file():
                continue
            history = json.loads(train.read_text()).get("history")
            if isinstance(history, list) and history:
                found[stage][name] = history
    return found


def plot_curve(series: dict[str, list[dict]], key: str, title: str, path: Path) -> bool:
    """One PNG: `key` against epoch, one line per model. False (and no file) when no model has the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for name, history in series.items():
        points = [(r["epoch"], r[key]) for r in history if _is_number(r.get(key)) and _is_number(r.get("epoch"))]
        if points:
            lines[name] = points
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in lines.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def paired_tables(paired: dict) -> str:
    """Markdown: per task, each model's NDCG@10 difference to each reference with its 95% interval, and
    whether the interval excludes 0 ("not significant" when it does not)."""
    parts = []
    for task, models in paired.items():
        rows = [(m, ref, d) for m, by_ref in models.items() for ref, d in by_ref.items() if d.get("diff") is not None]
        if not rows:
            continue
        parts += [f"### {task} task: NDCG@10 differences (same test examples, 95% bootstrap interval over users)", "",
                  "| model | minus | diff | ci95 | verdict |", "|---|---|---:|---:|---|"]
        for model, ref, d in rows:
            low, high = d["ci95"]
            parts.append(f"| {model} | {ref} | {d['diff']:+.4f} | [{low:+.4f}, {high:+.4f}] | {verdict(d)} |")
        parts.append("")
    return "\n".join(parts)


def render(tasks: dict, rest: dict, images: list[tuple[str, str]]) -> str:
    parts = ["# LSVCR run report", ""]
    paired = rest.get("paired") if isinstance(rest.get("paired"), dict) else {}
    described = {k: v for k, v in rest.items() if k != "paired"}
    if described:
        parts += [f"- **{key}**: {_describe(value)}" for key, value in described.items()] + [""]
    for task, models in tasks.items():
        parts += [f"## {task} task", "", metrics_table(models), ""]
    if paired:
        parts += ["## Paired differences", "", paired_tables(paired)]
    if images:
        parts += ["## Training curves", ""]
        parts += [f"![{title}]({file})" for file, title in images] + [""]
    return "\n".join(parts)


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md and the curve PNGs into `out` (default: the folder of metrics.json); returns the
    report path."""
    metrics_path = find_metrics(run_dir)
    try:
        data = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics_path} is not JSON: {err}") from None
    tasks, rest = split_result(data)
    folder = Path(out) if out else metrics_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = data.get("checkpoints") if isinstance(data.get("checkpoints"), dict) else {}
    found = histories(checkpoints, metrics_path.parent)
    images = []
    for stem, title, stage, key in CURVES:
        if plot_curve(found[stage], key, title, folder / f"{stem}.png"):
            images.append((f"{stem}.png", title))
    path = folder / "report.md"
    path.write_text(render(tasks, rest, images))
    if isinstance(rest.get("paired"), dict):
        print(paired_tables(rest["paired"]), flush=True)
    print(f"report: wrote {path} and {len(images)} curve(s)", flush=True)
    return path
