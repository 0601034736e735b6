"""`lsvcr continuous`: keep the served SR model fresh while events stream in.

    lsvcr continuous [--config configs/continuous.yaml] workdir=DIR registry=DIR bootstrap=HOST:PORT [key=value ...]

One loop, one step at a time (the window steps are lsvcr/windows.py):
1. a consumer-group child process (`python -m ingestion.consumer`) writes the event log; its committed
   offsets are the job's offsets, so a restart resumes where the group stopped;
2. when event-log files change, the features folder is extended incrementally (every example lands in its
   train split: the job cuts its own windows, below);
3. every `every_examples` new examples, or every `every_minutes` with at least one, a window folder is cut
   from the newest examples (oldest to newest: train | valid | held-out test, sizes in examples of the
   video task), and the SR model is fine-tuned on it with Ray Train, warm-started from the serving version
   (ID tables remapped by item id, since the catalog grows);
4. the candidate and the serving version are scored on the held-out slice; the candidate is published
   unless it is worse by more than `margin` (mean NDCG@5 of the two tasks), and a refusal says why;
5. each cycle appends one JSON line to `metrics.jsonl` (and stdout): version, freshness, eval scores, times.

Stage 1 (align) can be re-run every `align_every` trained cycles; its output then starts that cycle's
fine-tuning instead of the serving version.

Restart safety: `state.json` (written atomically) holds the last trained window's cut and any trained but
not yet published candidate. A window at or before that cut is never trained again; a candidate trained
before a kill is evaluated and published on restart instead of being retrained. A window killed during
training was never completed, so it is trained once when the job comes back.

Stopping: SIGTERM, SIGINT or the stop file (`workdir/STOP`) finish the current step and exit 0.

Storage: `workdir` and `eventlog` are the driver node's own folders (the consumer commits offsets with fsync +
rename and keeps a SQLite sequence store; the incremental features build, windows and checkpoints are local
files the driver reads), so they must be file system paths. What other machines read may be URIs: the
registry (serving), `finetune.storage_path` (Ray Train checkpoints) and `windows_uri`, where each cycle's window folder
is uploaded for the Ray Train workers on other nodes (deleted again once the cycle is trained).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core import storage
from core.config import ConfigError, require, require_at_least
from core.contract import TASKS
from core.paths import PROJECT_ROOT, child_env
from core.runtime import init_ray
from features.build import build_features, eventlog_files
from features.config import FeaturesConfig
from features.folder import FeaturesFolder
from ingestion.consumer import IngestConfig
from lsvcr.windows import (
    METRIC,
    align_due,
    cut_window,
    mean_score,
    publish_decision,
    read_example_ts,
    should_train,
    warm_start,
    window_bounds,
    write_json_atomic,
)
from trainers.align import AlignConfig, align
from trainers.evaluate import evaluate_fns, scorer_fn
from trainers.finetune import FinetuneConfig, finetune
from trainers.registry import Registry
from trainers.scoring import Scorer

# Every example goes to the train split of the features folder: the global cut sits beyond any event time
# (year 2255), and this job cuts its own sliding windows by time.
NO_SPLIT_TS = 9_000_000_000_000


@dataclass
class ContinuousConfig:
    workdir: str  # state.json, metrics.jsonl, features/, windows/, checkpoints/: a folder on the driver's node
    registry: str  # model registry serving follows: a path, or a URI such as s3://bucket/registry
    # Where the fine-tuning workers read each cycle's window: "" = workdir/windows/<name> (one machine, or a
    # workdir every node mounts); a URI (s3://bucket/lsvcr/windows) or a shared folder: uploaded there first.
    windows_uri: str = ""
    bootstrap: str = ""  # Kafka bootstrap servers; "" = $LSVCR_KAFKA_BOOTSTRAP
    topic_prefix: str = ""
    group: str = "lsvcr-ingest"  # consumer group writing the event log
    eventlog: str = ""  # "" = workdir/eventlog
    consume: bool = True  # run the consumer child process (false: another `lsvcr ingest` writes the log)
    # The incremental features build: its event log, folder and split are the job's (set in __post_init__);
    # override the rest with dotted keys (features.encoder=hash).
    features: FeaturesConfig = field(default_factory=lambda: FeaturesConfig(
        eventlog="<workdir>/eventlog", out="<workdir>/features",
        # The incremental build needs a fixed alive window (each event's own one would change as late-published
        # videos arrive, and earlier examples would no longer match later ones): 7 days covers the
        # generator's timeline and a week of a real catalog.
        negative_window_ms=7 * 24 * 3_600_000))
    # When to train.
    every_examples: int = 2000  # K new examples (both tasks) since the last trained window
    every_minutes: float = 10.0  # T: train anyway after this long if anything is new
    poll_s: float = 5.0
    # Window sizes, in video-task examples (comment examples follow the same time bounds).
    window_examples: int = 50_000
    valid_examples: int = 500
    holdout_examples: int = 500
    min_train_examples: int = 100
    # Publishing.
    margin: float = 0.01  # refuse when candidate NDCG@5 < serving NDCG@5 - margin
    max_eval_examples: int = 5000
    # Each cycle's fine-tuning: its features (the window), out and init are the job's; override the rest with
    # dotted keys (finetune.lr=3e-4, finetune.size.hidden=128). Stage 1 runs take its model size and workers.
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        features="<each cycle's window>", out="<each cycle's checkpoint>", epochs=2, patience=1))
    init: Optional[str] = None  # checkpoint to start from while the registry is empty
    # Stage 1 on a slower schedule: every N trained cycles (0 = never).
    align_every: int = 0
    align_llm_mode: str = "frozen"
    align_max_examples: int = 2000
    # Bounds (tests, benchmark): stop after this many trained cycles or published versions (0 = never).
    max_cycles: int = 0
    max_versions: int = 0
    keep_refused: bool = False  # keep refused candidates' window folders (for inspection)
    # A failed step (features or training) is logged and retried at the next poll; this many in a row stop
    # the job with the last error.
    max_failed_steps: int = 3

    def __post_init__(self):
        if not self.workdir or not self.registry:
            raise ConfigError("ContinuousConfig: workdir and registry are required")
        self.bootstrap = self.bootstrap or os.environ.get("LSVCR_KAFKA_BOOTSTRAP", "")
        if self.consume and not self.bootstrap:
            raise ConfigError("ContinuousConfig.bootstrap is required when consume=true "
                              "(or set LSVCR_KAFKA_BOOTSTRAP)")
        require_at_least(self, 1, "every_examples", "window_examples", "valid_examples", "holdout_examples",
                         "min_train_examples", "max_failed_steps")
        require_at_least(self, 0, "every_minutes", "poll_s", "margin", "max_eval_examples", "align_every",
                         "max_cycles", "max_versions", "align_max_examples")
        require(self, self.features.negative_window_ms >= 1, "features.negative_window_ms",
                "must be >= 1 (the incremental build needs a fixed alive window)")
        require(self, self.finetune.model == "sr", "finetune.model", "must be 'sr' (the served model)")
        require(self, self.finetune.size.max_history <= self.features.max_history, "finetune.size.max_history",
                f"must be <= features.max_history ({self.features.max_history}): longer histories are not built")
        for name in ("workdir", "eventlog"):
            if not storage.is_local(getattr(self, name)):
                raise ConfigError(f"ContinuousConfig.{name}={getattr(self, name)!r}: must be a file system path on "
                                  "the driver's node: the consumer commits its offsets with fsync + rename and keeps "
                                  "a SQLite sequence store there, which object storage cannot do. What other nodes "
                                  "read may be URIs: registry, finetune.storage_path, windows_uri")
        if self.windows_uri and storage.is_local(self.windows_uri) and storage.is_local(self.workdir) and \
                storage.local_path(self.windows_uri).resolve() == (Path(self.workdir) / "windows").resolve():
            raise ConfigError("ContinuousConfig.windows_uri: give another location than workdir/windows "
                              "(the job cuts its windows there), or leave it empty")

        # Every example goes to the train split (the global cut lies beyond any event time): the job cuts its
        # own windows. workdir is this node's (docs/CLUSTER.md), so the build runs here.
        self.features = dataclasses.replace(
            self.features, eventlog=str(self.eventlog_dir), out=str(Path(self.workdir) / "features"),
            incremental=True, split="global_time", split_valid_ts=NO_SPLIT_TS, split_test_ts=NO_SPLIT_TS,
            on_driver_node=True)

    @property
    def eventlog_dir(self) -> Path:
        return Path(self.eventlog or Path(self.workdir) / "eventlog")


def _finetune_config(config: ContinuousConfig, window: str | Path, out: Path, init: Path | None) -> FinetuneConfig:
    return dataclasses.replace(config.finetune, features=str(window), out=str(out),
                               init=str(init) if init else None, max_eval_examples=config.max_eval_examples)


# ------------------------------------------------------------------------------------------- the job


class ContinuousTrainer:
    def __init__(self, config: ContinuousConfig):
        self.config = config
        self.workdir = Path(config.workdir).resolve()
        self.features = self.workdir / "features"
        self.state_path = self.workdir / "state.json"
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.stop_file = self.workdir / "STOP"
        self.stop = threading.Event()
        self.consumer: subprocess.Popen | None = None
        self.built_files: list[str] | None = None
        self.state = {"trained_cut": None, "trained_cycles": 0, "published": [], "pending": None,
                      "in_progress": None, "last_train_wall": time.time()}
        self._gauges = None
        self.failed_steps = 0

    # ---- setup / cleanup ----------------------------------------------------------------------------

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.eventlog_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(self.config.registry)
        if self.state_path.exists():
            self.state.update(json.loads(self.state_path.read_text()))
            self._log(f"resuming: trained up to ts {self.state['trained_cut']}, "
                      f"{self.state['trained_cycles']} cycles, published {self.state['published']}")
            if self.state["in_progress"]:
                self._log(f"the previous run stopped while training window {self.state['in_progress']}; "
                          "it was not completed and will be trained once")
        self.stop_file.unlink(missing_ok=True)
        self.state["pid"] = os.getpid()  # lets an operator (or the restart test) find the driver
        self._save_state()
        init_ray()
        # After Ray: our handlers must be the ones in place.
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.config.consume:
            self._start_consumer()

    def _on_signal(self, signum, frame) -> None:
        self._log(f"signal {signum}: finishing the current step, then exiting")
        self.stop.set()

    def _start_consumer(self) -> None:
        ingest = IngestConfig(eventlog=str(self.config.eventlog_dir), bootstrap=self.config.bootstrap,
                              group=self.config.group, topic_prefix=self.config.topic_prefix,
                              flush_interval_s=1.0, instance_id=f"{self.config.group}-continuous")
        env = child_env()
        env.pop("RAY_ADDRESS", None)  # the consumer does not need Ray
        log = open(self.workdir / "consumer.log", "ab")
        self.consumer = subprocess.Popen([sys.executable, "-m", "ingestion.consumer",
                                          json.dumps(dataclasses.asdict(ingest))],
                                         cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._log(f"consumer pid {self.consumer.pid} (group {self.config.group}), log {self.workdir / 'consumer.log'}")

    def cleanup(self) -> None:
        if self.consumer is not None and self.consumer.poll() is None:
            # The consumer commits offsets only after durable writes, so ending it at any point loses nothing.
            self.consumer.terminate()
            try:
                self.consumer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.consumer.kill()
                self.consumer.wait()
        self._save_state()

    # ---- loop -----------------------------------------------------------------------------------------

    def stopping(self) -> bool:
        if self.stop_file.exists():
            self.stop.set()
        return self.stop.is_set()

    def run(self) -> dict:
        self.setup()
        try:
            if self.state["pending"]:
                self._finish_pending()
            while not self.stopping() and not self._bounds_reached():
                if self.consumer is not None and self.consumer.poll() is not None:
                    raise RuntimeError(f"the consumer exited with {self.consumer.returncode}; "
                                       f"see {self.workdir / 'consumer.log'}")
                self._step_or_retry()
                self.stop.wait(self.config.poll_s)
        finally:
            self.cleanup()
        summary = {"trained_cycles": self.state["trained_cycles"], "published": self.state["published"],
                   "trained_cut": self.state["trained_cut"]}
        self._log(f"stopped: {json.dumps(summary)}")
        return summary

    def _bounds_reached(self) -> bool:
        c = self.config
        return ((c.max_cycles and self.state["trained_cycles"] >= c.max_cycles)
                or (c.max_versions and len(self.state["published"]) >= c.max_versions))

    def _step_or_retry(self) -> None:
        """One step; a failure is logged and the step retried at the next poll (the features build and the
        window's training both start over from the saved state), up to max_failed_steps in a row."""
        try:
            self.step()
        except Exception as err:
            self.failed_steps += 1
            self._log(f"step failed ({self.failed_steps} of {self.config.max_failed_steps} in a row allowed): "
                      f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
            if self.failed_steps >= self.config.max_failed_steps:
                raise
        else:
            self.failed_steps = 0

    def step(self) -> None:
        """Extend the features when the log changed; train one window when due."""
        built = self._extend_features()
        if not (self.features / "manifest.json").exists():
            return
        ts = {task: read_example_ts(self.features, task) for task in TASKS}
        trained = self.state["trained_cut"]
        new = sum(int((t > trained).sum()) if trained is not None else len(t) for t in ts.values())
        minutes = (time.time() - self.state["last_train_wall"]) / 60
        trigger = should_train(new, minutes, self.config.every_examples, self.config.every_minutes)
        if trigger is None:
            return
        bounds = window_bounds(ts["video"], self.config.window_examples, self.config.valid_examples,
                               self.config.holdout_examples, self.config.min_train_examples)
        if bounds is None or (trained is not None and bounds["cut"] <= trained):
            return
        self.cycle(bounds, trigger, new, built)

    def _extend_features(self) -> float:
        files = [f for table in ("videos", "comments", "video_events", "comment_events")
                 for f in eventlog_files(self.config.eventlog_dir, table)]
        if not files or files == self.built_files:
            return 0.0
        started = time.time()
        build_features(self.config.features)
        self.built_files = files
        return time.time() - started

    def cycle(self, bounds: dict, trigger: str, new_examples: int, features_s: float) -> None:
        started = time.time()
        n = self.state["trained_cycles"] + 1
        name = f"c{n:05d}-{bounds['cut']}"
        window = self.workdir / "windows" / name
        counts = cut_window(self.features, window, bounds)
        self._log(f"cycle {n} ({trigger}, {new_examples} new examples): window {bounds}, examples {counts}")
        if sum(counts[t]["train"] for t in TASKS) == 0:
            return
        shared = self._share(window)
        init, init_from = self._init_for(window, n, shared)
        self.state["in_progress"] = {"cycle": n, **bounds}
        self._save_state()
        train_started = time.time()
        ckpt = Path(finetune(_finetune_config(self.config, shared, self.workdir / "checkpoints" / name, init)))
        train_s = time.time() - train_started
        if shared != str(window):
            storage.delete(shared)  # the workers are done with it; the local window stays for evaluation
        self.state.update(trained_cut=bounds["cut"], trained_cycles=n, in_progress=None,
                          last_train_wall=time.time(),
                          pending={"cycle": n, "name": name, "bounds": bounds, "ckpt": str(ckpt),
                                   "window": str(window), "trigger": trigger, "train_s": train_s,
                                   "features_s": features_s, "new_examples": new_examples, "counts": counts,
                                   "init_from": init_from, "started": started})
        self._save_state()
        self._finish_pending()

    def _share(self, window: Path) -> str:
        """Where the Ray Train workers read the window: the local folder, or its upload to windows_uri
        (manifest.json last)."""
        if not self.config.windows_uri:
            return str(window)
        uri = storage.join(self.config.windows_uri, window.name)
        storage.upload_dir(window, uri, "manifest.json")
        return uri

    def _init_for(self, window: Path, n: int, shared: str) -> tuple[Path | None, str]:
        """What this cycle's fine-tuning starts from: stage 1 when due (reading `shared`, the window as the
        workers see it), else the serving version."""
        if align_due(n - 1, self.config.align_every):
            out = self.workdir / "align" / window.name
            tuned = self.config.finetune  # stage 2 loads stage 1's weights strictly: the same model size
            align(AlignConfig(features=shared, out=str(out), llm_mode=self.config.align_llm_mode,
                              max_examples=self.config.align_max_examples, num_workers=tuned.num_workers,
                              use_gpu=tuned.use_gpu, size=tuned.size, time_features=tuned.time_features))
            return out, f"align {out}"
        version = self.registry.current()
        if version is not None:
            source = self.registry.path(version)
            features = self.registry.features_path(version)
        elif self.config.init:
            return Path(self.config.init), f"init {self.config.init}"
        else:
            return None, "scratch"
        target = self.workdir / "init" / window.name
        init = warm_start(source, features, window, target, _finetune_config(self.config, window, target, None))
        return init, f"serving {version}"

    def _finish_pending(self) -> None:
        """Evaluate the trained candidate against the serving version and publish or refuse it."""
        pending = self.state["pending"]
        ckpt, window = Path(pending["ckpt"]), Path(pending["window"])
        serving = self.registry.current()
        already = [v for v in self.registry.versions()
                   if self.registry.manifest(v).get("source") == str(ckpt.resolve())]
        folder = FeaturesFolder(window)
        fns = {"candidate": scorer_fn(Scorer(ckpt, folder))}
        if serving is not None:
            fns["serving"] = scorer_fn(Scorer(self.registry.path(serving), folder))
        eval_started = time.time()
        results = evaluate_fns(folder, fns, "test", max_examples=self.config.max_eval_examples)
        eval_s = time.time() - eval_started
        cand, serv = mean_score(results, "candidate"), mean_score(results, "serving")
        if already:  # published just before a kill: do not publish it twice
            ok, reason, version = True, "published before a restart", already[0]
        else:
            ok, reason = publish_decision(cand, serv, self.config.margin)
            version = None
            if ok:
                version = self.registry.publish(ckpt, window, metrics={"heldout": results})
        if ok and version not in self.state["published"]:
            self.state["published"].append(version)
        if not ok and not self.config.keep_refused:
            shutil.rmtree(window, ignore_errors=True)
        b = pending["bounds"]
        record = {
            "at": time.time(), "cycle": pending["cycle"], "trigger": pending["trigger"],
            "decision": "published" if ok else "refused", "reason": reason, "version": version,
            "serving_version_before": serving, "serving_version": self.registry.current(),
            "window": b, "examples": pending["counts"], "new_examples": pending["new_examples"],
            "init_from": pending["init_from"],
            f"candidate_{METRIC}": cand, f"serving_{METRIC}": serv,
            "heldout": {task: {m: {k: v for k, v in r.items() if k in ("count", "ndcg@5", "recall@10", "mrr@10")}
                               for m, r in models.items()} for task, models in results.items()},
            "features_s": round(pending["features_s"], 3), "train_s": round(pending["train_s"], 3),
            "eval_s": round(eval_s, 3), "cycle_s": round(time.time() - pending["started"], 3),
            # Freshness in event time: the newest trained example vs the newest example the job had seen.
            "trained_upto_ts": b["valid_from"], "data_lag_ms": b["cut"] - b["valid_from"],
        }
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print("continuous: " + json.dumps(record), flush=True)
        self._report(record)
        self.state["pending"] = None
        self._save_state()

    def _report(self, record: dict) -> None:
        """Gauges for the Ray dashboard's metrics view (Prometheus through Ray)."""
        try:
            from ray.util import metrics
        except ImportError:
            return
        if self._gauges is None:
            self._gauges = {key: metrics.Gauge(f"lsvcr_continuous_{key}", help)
                            for key, help in (("version", "number of the version serving follows"),
                                              ("candidate_ndcg5", "held-out NDCG@5 of the last candidate"),
                                              ("train_s", "seconds of the last fine-tuning"),
                                              ("data_lag_ms", "event time between the newest trained and seen example"))}
        current = record["serving_version"]
        self._gauges["version"].set(int(current[1:]) if current else 0)
        if record[f"candidate_{METRIC}"] is not None:
            self._gauges["candidate_ndcg5"].set(record[f"candidate_{METRIC}"])
        self._gauges["train_s"].set(record["train_s"])
        self._gauges["data_lag_ms"].set(record["data_lag_ms"])

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def _log(self, message: str) -> None:
        print(f"continuous [{time.strftime('%H:%M:%S')}]: {message}", flush=True)


def run_continuous(config: ContinuousConfig) -> dict:
    return ContinuousTrainer(config).run()
