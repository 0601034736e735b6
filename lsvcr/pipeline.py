"""The offline path (`lsvcr run`) and the demo: every step is a real component, called in order.

replay -> Kafka -> ingest -> event log -> Ray Data features -> Ray Train fine-tuning (SR, SASRec)
-> evaluation against baselines [-> Ray Serve, in the demo].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from core.config import load_config
from core.paths import run_dir
from core.runtime import init_ray
from devtools import broker
from devtools.generator import GeneratorConfig, generate
from features.build import build_features
from features.config import FeaturesConfig
from ingestion.consumer import IngestConfig, ingest
from ingestion.replay import replay
from ingestion.topics import ensure_topics
from lsvcr.suite import train_all
from serving.app import show_samples, start, stop
from trainers.evaluate import format_table
from trainers.registry import Registry


@dataclasses.dataclass
class PipelineConfig:
    data: str
    work: str
    results: str | None = None
    epochs: int | None = None  # None: the trainer's default
    num_workers: int = 2
    topic_prefix: str | None = None  # None: a prefix unique to this run, so runs never share topics
    # Models to train and evaluate (lsvcr.suite.MODEL_NAMES); the LLM-aligned ones take much longer.
    models: tuple[str, ...] = ("popularity", "sasrec", "sr_no_align")
    align: tuple[str, ...] = ()  # key=value overrides for stage 1 (e.g. max_examples=2000)

    def __post_init__(self):
        if not Path(self.data).is_dir():
            raise FileNotFoundError(f"dataset folder {self.data} does not exist")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be >= 1")


class Steps:
    """Numbered progress lines with timings, so a long run shows where it is."""

    def __init__(self, total: int):
        self.total, self.n, self.t = total, 0, time.monotonic()

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n=== [{self.n}/{self.total}] {title}  (t+{time.monotonic() - self.t:.0f}s)", flush=True)


def _local_broker() -> tuple[str, bool]:
    """The broker to use and whether this call started it (and so should stop it)."""
    if os.environ.get("LSVCR_KAFKA_BOOTSTRAP"):
        return os.environ["LSVCR_KAFKA_BOOTSTRAP"], False
    was_running = broker.status()["ready"]
    return broker.start(), not was_running


def run_pipeline(cfg: PipelineConfig, steps: Steps | None = None) -> dict:
    steps = steps or Steps(6)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    prefix = cfg.topic_prefix
    if prefix is None:
        prefix = "run-" + hashlib.sha1(f"{work.resolve()}-{time.time_ns()}".encode()).hexdigest()[:10] + "."

    steps("Kafka broker")
    bootstrap, started_broker = _local_broker()
    ensure_topics(bootstrap, prefix)
    try:
        steps(f"replay {cfg.data} -> Kafka topics {prefix}*")
        replayed = replay(cfg.data, bootstrap, prefix)

        steps("ingest: consumer group -> Parquet event log")
        eventlog = work / "eventlog"
        ingested = ingest(IngestConfig(eventlog=str(eventlog), bootstrap=bootstrap, group=prefix + "ingest",
                                       topic_prefix=prefix, until_idle_s=3.0))
    finally:
        if started_broker:
            broker.stop()

    steps("features: point-in-time histories, splits and MiniLM item embeddings (Ray Data)")
    init_ray()
    features = work / "features"
    manifest = build_features(load_config(FeaturesConfig, None, {"eventlog": str(eventlog), "out": str(features)}))

    trained = [m for m in cfg.models if m != "popularity"]
    steps(f"train {', '.join(trained)} with Ray Train ({cfg.num_workers} workers), evaluate on the test split")
    finetune = [f"num_workers={cfg.num_workers}"] + ([f"epochs={cfg.epochs}"] if cfg.epochs else [])
    suite = train_all(features, work / "models", models=cfg.models, finetune=finetune,
                      align=[f"num_workers={cfg.num_workers}", *cfg.align], split="test")
    results, checkpoints = suite["metrics"], suite["checkpoints"]
    print(format_table(results), flush=True)
    if cfg.results:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results).write_text(json.dumps(results, indent=2))
        print(f"[run] metrics written to {cfg.results}", flush=True)
    return {"results": results, "features": str(features), "checkpoints": checkpoints,
            "replayed": replayed, "ingested": ingested, "manifest": manifest}


def demo(users: int = 2000, seed: int = 0, epochs: int | None = None, serve_seconds: float = 0.0) -> dict:
    """Generate the bundled default dataset, run everything, serve, and show two users' recommendations."""
    steps = Steps(8)
    root = run_dir() / "demo"
    data = root / f"data-u{users}-s{seed}"
    steps(f"generate a synthetic dataset: {users} users, seed {seed}")
    if not (data / "comment_events.jsonl").exists():
        generate(str(data), load_config(GeneratorConfig, None, {"users": users, "seed": seed}))
    else:
        print(f"[demo] reusing {data}")
    out = run_pipeline(PipelineConfig(data=str(data), work=str(root / "work"), results=str(root / "results.json"),
                                      epochs=epochs), steps)

    steps("publish to the model registry, serve with Ray Serve, ask for recommendations")

    registry = root / "registry"
    version = Registry(registry).publish(out["checkpoints"]["sr_no_align"], out["features"])
    print(f"[demo] published sr_no_align as {version} in {registry}")
    url = start(registry=str(registry), access_log=serve_seconds > 0)
    try:
        print("\nTest-split metrics (video: the target among 99 sampled videos; comment: among the other comments"
              f" under the same video, up to 99):\n{format_table(out['results'])}")
        show_samples(url, out["features"], n_users=2)
        if serve_seconds > 0:
            print(f"[demo] serving at {url} for {serve_seconds:.0f}s (docs at {url}/docs)", flush=True)
            time.sleep(serve_seconds)
    finally:
        stop()
    print(f"\n[demo] done. Metrics: {root / 'results.json'}", flush=True)
    return out
