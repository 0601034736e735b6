"""The offline path (`lsvcr run`): every step is a real component, called in order.

replay -> Kafka -> ingest -> event log -> Ray Data features -> Ray Train fine-tuning (SR, SASRec)
-> evaluation against baselines. The demo (lsvcr/demo.py) runs it and then serves the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from core.config import load_config, parse_overrides, require
from core.runtime import init_ray
from devtools import broker
from features.build import build_features
from features.config import FeaturesConfig
from ingestion.consumer import IngestConfig, ingest
from ingestion.replay import replay
from ingestion.topics import ensure_topics
from lsvcr.suite import SERVED_MODEL, train_all
from trainers.evaluate import format_table

# Stage 1 as the quality benchmark measured it: 64 examples per worker and task (AlignConfig's 16 is LoRA's, on
# a GPU). `align` overrides come after, so they win.
STAGE1_DEFAULTS = ("batch_size=64",)


@dataclasses.dataclass
class PipelineConfig:
    data: str
    work: str
    results: str | None = None
    epochs: int | None = None  # None: the trainer's default
    num_workers: int = 2
    topic_prefix: str | None = None  # None: a prefix unique to this run, so runs never share topics
    # Models to train and evaluate (lsvcr.suite.MODEL_NAMES); the LLM-aligned ones take much longer. The served
    # model, and sr_no_align beside it to show what its stage 1 adds.
    models: tuple[str, ...] = ("popularity", "sasrec", "sr_no_align", SERVED_MODEL)
    align: tuple[str, ...] = ()  # key=value overrides for stage 1 (e.g. max_examples=2000)
    features: tuple[str, ...] = ()  # key=value overrides for the features build (e.g. encoder=llm)
    seeds: int = 1  # every trained model is trained this many times (seed 0..N-1)

    def __post_init__(self):
        require(self, Path(self.data).is_dir(), "data", "must be a dataset folder (docs/DATA.md section 1)")
        require(self, self.epochs is None or self.epochs >= 1, "epochs", "must be >= 1")
        require(self, self.seeds >= 1, "seeds", "must be >= 1")


class Steps:
    """Numbered progress lines with timings, so a long run shows where it is; `say` prints a result line.
    Both go to `out` (the console, also when the demo sends everything else to its log file)."""

    def __init__(self, total: int, out: TextIO | None = None):
        self.total, self.n, self.t, self.out = total, 0, time.monotonic(), out

    def __call__(self, title: str) -> None:
        self.n += 1
        self.say(f"\n=== [{self.n}/{self.total}] {title}  (t+{time.monotonic() - self.t:.0f}s)")

    def say(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)


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
    manifest = build_features(load_config(FeaturesConfig, None, {**parse_overrides(list(cfg.features)),
                                                                  "eventlog": str(eventlog), "out": str(features)}))

    trained = [m for m in cfg.models if m != "popularity"]
    times = f", {cfg.seeds} seeds each" if cfg.seeds > 1 else ""
    steps(f"train {', '.join(trained)} with Ray Train ({cfg.num_workers} workers{times}), evaluate on the test split")
    finetune = [f"num_workers={cfg.num_workers}"] + ([f"epochs={cfg.epochs}"] if cfg.epochs else [])
    suite = train_all(features, work / "models", models=cfg.models, finetune=finetune,
                      align=[f"num_workers={cfg.num_workers}", *STAGE1_DEFAULTS, *cfg.align], split="test",
                      seeds=cfg.seeds)
    results, checkpoints = suite["metrics"], suite["checkpoints"]
    steps.say("\nTest-split metrics (video: the target among the sampled candidates of the protocol named; comment: "
              f"among the other comments under the same video):\n{format_table(results)}")
    if cfg.results:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results).write_text(json.dumps(results, indent=2))
        steps.say(f"[run] metrics written to {cfg.results}")
    return {"results": results, "features": str(features), "checkpoints": checkpoints,
            "tables": suite.get("tables", {}), "replayed": replayed, "ingested": ingested, "manifest": manifest}
