"""`lsvcr benchmark NAME`: run one benchmark, write benchmarks/results/NAME.json and refresh BENCHMARKS.md.

Each benchmark is a module with `run(overrides: list[str]) -> dict` returning a flat dict of figures with
units in the key names (DESIGN.md section 10). This file adds `machine`, `git_commit` and `when`.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import subprocess
from pathlib import Path

from core import config

BENCHMARKS = {
    "ingest": "benchmarks.ingest",
    "features": "benchmarks.features",
    "train": "benchmarks.train",
    "quality": "benchmarks.quality",
    "serve": "benchmarks.serve",
    "continuous": "benchmarks.continuous",
}
ROOT = Path(__file__).resolve().parent.parent


def parse_overrides(name: str, defaults: dict, overrides: list[str]) -> dict:
    """A benchmark's key=value overrides over its defaults, each cast to its default's type."""
    opts = dict(defaults)
    for key, value in config.parse_overrides(overrides).items():
        if key not in opts:
            raise SystemExit(f"{name} benchmark: unknown override {key!r}; known: {sorted(opts)}")
        try:
            opts[key] = type(opts[key])(value)
        except ValueError:
            raise SystemExit(f"{name} benchmark: {key}={value!r} is not a {type(opts[key]).__name__}") from None
    return opts


def machine() -> dict:
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "ram_gb": round(mem_kb / 2**20, 1)}


def git_commit(root: Path = ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, figures: dict, root: Path = ROOT, command: str | None = None) -> Path:
    """Write the results file and replace this benchmark's section of BENCHMARKS.md. `command` is the command
    line that made the figures (default: `lsvcr benchmark NAME`)."""
    result = {**figures, "command": command or f"lsvcr benchmark {name}", "machine": machine(),
              "git_commit": git_commit(root),
              "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    path = root / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    _refresh_markdown(root / "BENCHMARKS.md", name, result)
    return path


def _refresh_markdown(md: Path, name: str, result: dict) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    # Nested tables (quality's per-model metrics) are for the results file; their notes render them.
    rows = "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in result.items() if k != "notes" and not _is_table(v))
    notes = f"\n\n{result['notes']}" if result.get("notes") else ""
    section = (f"{start}\n## {name}\n\n`{result['command']}` on {result['when']} at {result['git_commit']} "
               f"({result['machine']['cores']} cores, {result['machine']['ram_gb']} GB)\n\n| key | value |\n|---|---|\n"
               f"{rows}{notes}\n{end}")
    text = md.read_text() if md.exists() else "# Benchmarks\n\nEvery figure is measured by `lsvcr benchmark NAME`; raw files in benchmarks/results/.\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)


def _is_table(value) -> bool:
    return isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict):
        return "`" + json.dumps(value, separators=(",", ":")) + "`"
    return str(value)


def run(name: str, overrides: list[str]) -> Path:
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as err:
        raise SystemExit(f"benchmark {name!r} is not implemented yet ({err})") from None
    figures = module.run(overrides)
    # A benchmark with variants names its results file per variant (quality set=freshness: quality_freshness).
    results_name = getattr(module, "results_name", None)
    path = write_results(results_name(overrides) if results_name else name, figures,
                         command=" ".join(["lsvcr benchmark", name, *overrides]))
    print(json.dumps(json.loads(path.read_text()), indent=2))
    print(f"[benchmark] wrote {path} and BENCHMARKS.md")
    return path
