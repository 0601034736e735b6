"""`lsvcr benchmark continuous`: freshness of the served model and training cost per cycle.

One process runs the whole loop on one local Ray: a Kafka broker (LSVCR_KAFKA_BOOTSTRAP, or one started
here), the continuous trainer at its default settings (in the main thread: it installs signal handlers),
and the Serve app following the same registry. A generated dataset is replayed in two slices; each slice's
events are stamped with the wall-clock time at which they are produced (in their original order, one
millisecond apart), so an event's time is the moment it entered the system:

    event_to_served_model_s = (when /v1/health first answers with version v)
                              - (event time of the newest example v was trained on: its window's train bound)

The first slice makes the first version (serving starts from it); the figures are those of the last
version, trained on the second slice while Serve was running.

    lsvcr benchmark continuous                        # the default settings (what the target is about)
    lsvcr benchmark continuous features.encoder=hash finetune.epochs=1  # any ContinuousConfig key, or a field below
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx

from core.config import load_config
from devtools import broker
from devtools.generator import GeneratorConfig, generate
from ingestion.replay import replay
from ingestion.topics import ensure_topics
from lsvcr.continuous import ContinuousConfig, ContinuousTrainer
from serving.app import start, stop


@dataclasses.dataclass
class ContinuousBenchConfig:
    users: int = 600
    days: float = 4.0
    seed: int = 0
    first_fraction: float = 0.6  # share of the events in the first slice
    port: int = 18810
    timeout_s: float = 1800.0  # give up waiting for the second version after this long

    def __post_init__(self):
        if self.users < 10 or self.days <= 0 or not 0 < self.first_fraction < 1 or self.timeout_s <= 0:
            raise ValueError("users >= 10, days > 0, 0 < first_fraction < 1 and timeout_s > 0 are needed")


FILES = ("videos.jsonl", "comments.jsonl", "video_events.jsonl", "comment_events.jsonl")


def live_slices(source: Path, out: Path, first_fraction: float) -> tuple[Path, Path]:
    """Two dataset folders cut by event time; their ts are rewritten when each is replayed (stamp_now)."""
    rows = {name: [json.loads(line) for line in (source / name).read_text().splitlines() if line.strip()]
            for name in FILES}
    event_ts = sorted(r["ts"] for r in rows["video_events.jsonl"])
    middle = event_ts[int(len(event_ts) * first_fraction)]
    parts = []
    for part, keep in (("a", lambda t: t < middle), ("b", lambda t: t >= middle)):
        folder = out / part
        folder.mkdir(parents=True)
        for name in FILES:
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows[name] if keep(r["ts"])))
        parts.append(folder)
    return parts[0], parts[1]


def stamp_now(folder: Path, out: Path) -> int:
    """A copy of `folder` whose records are stamped with the current time, 1 ms apart in their original order
    (the newest one now). Returns the newest stamp (epoch ms)."""
    rows = [(r["ts"], i, name, r) for name in FILES
            for i, r in enumerate(json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip())]
    rows.sort(key=lambda x: (x[0], x[1]))
    now = int(time.time() * 1000)
    first = now - len(rows) + 1
    for rank, (_, _, _, r) in enumerate(rows):
        r["ts"] = first + rank
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        mine = sorted((x for x in rows if x[2] == name), key=lambda x: x[3]["ts"])
        (out / name).write_text("".join(json.dumps(x[3]) + "\n" for x in mine))
    return now


class ServeWatch:
    """Polls the app's /v1/health and records when each model version is first reported."""

    def __init__(self, url: str):
        self.url, self.first_seen, self.failed, self.done = url, {}, 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True, name="serve-watch")
        self.thread.start()

    def _poll(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.done.wait(0.2):
                try:
                    version = client.get(f"{self.url}/v1/health").json()["model_version"]
                except (httpx.HTTPError, ValueError, KeyError):
                    self.failed += 1
                    continue
                self.first_seen.setdefault(version, time.time())


def where_time_goes(record: dict, seen: float) -> dict:
    """event_to_served_model_s of one published version, in the phases that add up to it (seconds): from the
    newest trained event to the start of the feature build that covered it (ingest, the trigger's poll and
    the rest of any cycle then running), the build, fine-tuning, the rest of the cycle (window cut,
    evaluation against the serving version, publish), and the Serve app picking the version up."""
    cycle_start = record["at"] - record["cycle_s"]
    features_start = cycle_start - record["features_s"]
    return {"until_features_start": round(features_start - record["trained_upto_ts"] / 1000, 1),
            "features": round(record["features_s"], 1), "train": round(record["train_s"], 1),
            "evaluate_publish": round(record["cycle_s"] - record["train_s"], 1),
            "serve_pickup": round(seen - record["at"], 1)}


def run(overrides: list[str]) -> dict:
    fields = {f.name for f in dataclasses.fields(ContinuousConfig)}
    def theirs(override: str) -> bool:  # a ContinuousConfig key, nested ones (finetune.lr=...) included
        return override.split("=", 1)[0].split(".", 1)[0] in fields

    mine = [o for o in overrides if not theirs(o)]
    cfg = load_config(ContinuousBenchConfig, None, mine)
    # The Serve replica holds one logical CPU for as long as it runs: offer one more than training needs.
    os.environ.setdefault("LSVCR_RAY_CPUS", "5")
    work = Path(tempfile.mkdtemp(prefix="lsvcr-continuous-bench-"))
    bootstrap = os.environ.get("LSVCR_KAFKA_BOOTSTRAP") or broker.start()
    prefix = f"bench-cont-{int(time.time())}."
    ensure_topics(bootstrap, prefix)
    generate(work / "all", GeneratorConfig(users=cfg.users, seed=cfg.seed, days=cfg.days))
    first, second = live_slices(work / "all", work / "slices", cfg.first_fraction)
    cont = load_config(ContinuousConfig, None, [
        f"workdir={work / 'continuous'}", f"registry={work / 'registry'}", f"bootstrap={bootstrap}",
        f"topic_prefix={prefix}", f"group={prefix}ingest", "max_versions=2",
        # An embedding cache of its own: every text is new to the run, as new comments are in production.
        f"features.embed_cache={work / 'embeddings'}",
        *[o for o in overrides if theirs(o)]])
    trainer = ContinuousTrainer(cont)
    url = f"http://127.0.0.1:{cfg.port}"
    watch: dict = {}
    errors: list[str] = []

    def feed() -> None:
        """Slice one, wait for v0001 and start Serve on it, then slice two (while the trainer runs)."""
        try:
            stamp_now(first, work / "live-a")
            replay(work / "live-a", bootstrap, prefix)
            deadline = time.monotonic() + cfg.timeout_s
            # trainer.registry appears in the trainer's setup (main thread).
            while getattr(trainer, "registry", None) is None or trainer.registry.current() is None:
                if time.monotonic() > deadline or trainer.stop.is_set():
                    raise TimeoutError("no first version")
                time.sleep(1)
            start(registry=cont.registry, port=cfg.port, access_log=False, poll_s=0.5)
            watch["w"] = ServeWatch(url)
            stamp_now(second, work / "live-b")
            replay(work / "live-b", bootstrap, prefix)
        except Exception as err:  # the trainer is told to stop; the error is reported below
            errors.append(f"{type(err).__name__}: {err}")
            trainer.stop.set()

    started = time.time()
    feeder = threading.Thread(target=feed, daemon=True, name="feed")
    feeder.start()
    timer = threading.Timer(cfg.timeout_s, trainer.stop.set)
    timer.start()
    try:
        summary = trainer.run()
        feeder.join(timeout=60)
        last = summary["published"][-1] if summary["published"] else None
        deadline = time.monotonic() + 120
        while last and "w" in watch and last not in watch["w"].first_seen and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        timer.cancel()
        if "w" in watch:
            watch["w"].done.set()
        stop()
    if errors:
        raise RuntimeError(f"continuous benchmark failed: {errors[0]}")
    records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    published = [r for r in records if r["decision"] == "published"]
    seen = watch["w"].first_seen if "w" in watch else {}
    fresh = {r["version"]: seen[r["version"]] - r["trained_upto_ts"] / 1000 for r in published if r["version"] in seen}
    last = published[-1]["version"] if published else None
    return {
        "event_to_served_model_s": round(fresh[last], 1) if last in fresh else None,
        "event_to_served_model_parts_s": where_time_goes(published[-1], seen[last]) if last in fresh else None,
        "event_to_served_model_s_by_version": {v: round(s, 1) for v, s in fresh.items()},
        "cycle_train_s": round(sum(r["train_s"] for r in records) / len(records), 1) if records else None,
        "cycle_s": round(sum(r["cycle_s"] for r in records) / len(records), 1) if records else None,
        "features_s_last_cycle": records[-1]["features_s"] if records else None,
        "versions_published": len(published),
        "cycles": len(records),
        "health_poll_failures": watch["w"].failed if "w" in watch else None,
        "wall_s": round(time.time() - started, 1),
        "notes": (f"Generated data ({cfg.users} users, {cfg.days} days) replayed in two slices stamped with "
                  "wall-clock time, 1 ms apart. The figure is for the last version: from the event time of the "
                  "newest example it was trained on (its window's train bound) to the moment the running Serve "
                  "app first reported it. Continuous settings: defaults except "
                  f"{[o for o in overrides if o.split('=', 1)[0] in fields] or 'none'} (max_versions=2). "
                  "One process, one local Ray, Serve and training sharing the same cores. The embedding cache "
                  "starts empty. event_to_served_model_parts_s: where those seconds go (where_time_goes)."),
    }
