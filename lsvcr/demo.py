"""`lsvcr demo` (what `make demo` runs): generate the bundled default dataset, run the whole pipeline
(lsvcr/pipeline.py), publish the SR model, serve it with Ray Serve and show two users' recommendations.

The console shows the steps with their timings, the metrics table and the recommendations. Everything else
(Ray's own reports and warnings, the workers' progress lines, the generator's and the build's logs) goes to
`.run/demo/demo.log`, whose path the first line gives: `tail -f` it to watch a long step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO  # Optional: core.config coerces typing.Optional only

from core.config import load_config, require, require_at_least
from core.paths import run_dir
from devtools.generator import GeneratorConfig, generate
from features.folder import FeaturesFolder
from lsvcr.pipeline import PipelineConfig, Steps, run_pipeline
from lsvcr.suite import SERVED_MODEL
from serving.app import show_samples, start, stop
from trainers.registry import Registry


@contextlib.contextmanager
def console_and_log(log: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr to `log` (sys.stdout/sys.stderr and file descriptors 1 and 2, so
    Ray's threads and the child processes started meanwhile too), and yield a stream on the original console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log, "a", buffering=1) as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            console.close()


@dataclass
class DemoConfig:
    users: int = 2000  # generated users (docs/DATA.md section 1)
    seed: int = 0  # of the generated data
    epochs: Optional[int] = None  # stage 2 epochs; None: early stopping on valid decides
    serve_seconds: float = 0.0  # keep serving this long after the sample requests

    def __post_init__(self):
        require_at_least(self, 1, "users")
        require_at_least(self, 0, "serve_seconds")
        require(self, self.epochs is None or self.epochs >= 1, "epochs", "must be >= 1")


def demo(config: DemoConfig) -> dict:
    users, seed, epochs, serve_seconds = config.users, config.seed, config.epochs, config.serve_seconds
    root = run_dir() / "demo"
    log = root / "demo.log"
    print(f"[demo] Ray's reports, warnings and the workers' progress go to {log}", flush=True)
    started = time.monotonic()
    with console_and_log(log) as console:
        steps = Steps(8, out=console)
        out = _run(root, steps, users, seed, epochs, serve_seconds)
    print(f"\n[demo] done in {time.monotonic() - started:.0f}s. Metrics: {root / 'results.json'}; log: {log}",
          flush=True)
    return out


def _run(root: Path, steps: Steps, users: int, seed: int, epochs: int | None, serve_seconds: float) -> dict:
    data = root / f"data-u{users}-s{seed}"
    steps(f"generate a synthetic dataset: {users} users, seed {seed}")
    if not (data / "comment_events.jsonl").exists():
        generate(str(data), load_config(GeneratorConfig, None, {"users": users, "seed": seed}))
    else:
        steps.say(f"[demo] reusing {data}")
    out = run_pipeline(PipelineConfig(data=str(data), work=str(root / "work"), results=str(root / "results.json"),
                                      epochs=epochs), steps)

    steps("publish to the model registry, serve with Ray Serve, ask for recommendations")
    registry = root / "registry"
    version = Registry(registry).publish(out["checkpoints"][SERVED_MODEL], out["features"])
    steps.say(f"[demo] published {SERVED_MODEL} as {version} in {registry}")
    url = start(registry=str(registry), access_log=serve_seconds > 0)
    try:
        with contextlib.redirect_stdout(steps.out):
            show_samples(url, FeaturesFolder(out["features"]), n_users=2)
        if serve_seconds > 0:
            steps.say(f"[demo] serving at {url} for {serve_seconds:.0f}s (docs at {url}/docs)")
            time.sleep(serve_seconds)
    finally:
        stop()
    return out
