"""`lsvcr features build`: event log (docs/DATA.md section 2) -> features folder (section 3) with Ray Data.

    catalogs (pyarrow, driver) -> videos.parquet, comments.parquet, video_emb.npy, comment_emb.npy
    events (read_parquet) -> interaction rows -> groupby(video_idx): hot comments, comment candidates
        -> groupby(user_id): histories, examples, splits -> video negatives -> examples/<task>/<split>/
    users.parquet, manifest.json

The feature logic lives in `features/sequences.py` as pure functions; this file only wires them into Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features import sequences as seq
from features.embeddings import ENCODERS, embed_texts
from ingestion.schema import COMMENT_ACTIONS, POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS, VIDEO_ACTIONS
from lsvcr.config import ConfigError

SCHEMA_VERSION = 1
TASKS = ("video", "comment")
USERS_PARTS = "_users_parts"  # user rows written by the workers, merged into users.parquet at the end


@dataclass
class FeaturesConfig:
    eventlog: str
    out: str
    max_history: int = 50
    num_negatives: int = 99
    seed: int = 0
    # Video negatives come from videos published in [ts - window, ts); 0 means no lower bound.
    negative_window_ms: int = 0
    positive_video_actions: tuple[str, ...] = tuple(sorted(POSITIVE_VIDEO_ACTIONS))
    positive_comment_actions: tuple[str, ...] = tuple(sorted(POSITIVE_COMMENT_ACTIONS))
    encoder: str = "minilm"
    encoder_dim: int = 64  # only for encoders whose size is free (hash)
    embed_batch_size: int = 256
    embed_concurrency: int = 1
    embed_device: str = "cpu"
    embed_threads: int = 0  # torch threads per encoder actor; 0: the machine's cores / embed_concurrency
    shuffle_partitions: int = 0  # groupby partitions; 0: from the number of rows and CPUs

    def __post_init__(self):
        if not self.eventlog or not self.out:
            raise ConfigError("FeaturesConfig: eventlog and out are required")
        if Path(self.eventlog).resolve() == Path(self.out).resolve():
            raise ConfigError("FeaturesConfig: out must differ from eventlog")
        for name in ("max_history", "embed_batch_size", "embed_concurrency", "encoder_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FeaturesConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_negatives", "negative_window_ms", "embed_threads", "shuffle_partitions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FeaturesConfig.{name} must be >= 0, got {getattr(self, name)}")
        self.positive_video_actions = tuple(self.positive_video_actions)
        self.positive_comment_actions = tuple(self.positive_comment_actions)
        for name, known in (("positive_video_actions", VIDEO_ACTIONS), ("positive_comment_actions", COMMENT_ACTIONS)):
            actions = getattr(self, name)
            bad = sorted(set(actions) - set(known))
            if bad or not actions:
                raise ConfigError(f"FeaturesConfig.{name}: {list(actions)} must be a non-empty subset of {sorted(known)}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"FeaturesConfig.encoder: unknown {self.encoder!r}; known: {sorted(ENCODERS)}")
        if self.embed_device != "cpu" and not self.embed_device.startswith("cuda"):
            raise ConfigError(f"FeaturesConfig.embed_device: expected cpu or cuda[:n], got {self.embed_device!r}")


_STARTED = [time.time()]


def _log(message: str) -> None:
    print(f"features [{time.time() - _STARTED[0]:7.1f}s]: {message}", flush=True)


def eventlog_files(eventlog: Path, table: str) -> list[str]:
    """Visible Parquet files of one event-log table (writers keep temporary files hidden)."""
    folder = eventlog / table
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith((".", "_")))


def read_catalog(eventlog: Path, table: str) -> pa.Table:
    schema = seq.EVENTLOG_SCHEMA[table]
    files = eventlog_files(eventlog, table)
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f).select(schema.names).cast(schema) for f in files])


def _prepare_out(out: Path) -> None:
    """Remove what an earlier build left, so a rerun never mixes old and new files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("examples", USERS_PARTS):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in ("videos.parquet", "comments.parquet", "video_emb.npy", "comment_emb.npy", "users.parquet",
                 "manifest.json"):
        if (out / name).exists():
            (out / name).unlink()


def _counts(ds, keys: list[str]) -> dict[tuple, dict]:
    """Per-key counts and ts ranges: partial counts per block, merged here (cheaper than a shuffle)."""
    parts = ds.map_batches(seq.count_by, batch_format="pyarrow", fn_kwargs={"keys": keys}).take_all()
    return seq.merge_counts(parts, keys)


def write_parts(batch: pa.Table, out: str, video_ts: np.ndarray, num_negatives: int, seed: int,
                window_ms: int) -> pa.Table:
    """Ray Data sink for stage B's output: add video negatives, write each (task, split) slice of the batch
    and its user rows as Parquet files, and return the batch's row counts (count_by) for the manifest.

    One pass writes every split (a scan per split costs seconds of scheduling each). A file's name is a hash
    of its rows' ids, so a retried task overwrites its own file instead of adding a copy.
    """
    root = Path(out)
    video_rows = batch.filter(pa.compute.equal(batch["row_kind"], "video"))
    with_negatives = {"video": seq.add_video_negatives(video_rows, video_ts, num_negatives, seed, window_ms)}
    for task in TASKS:
        rows = with_negatives.get(task, batch)
        for split in seq.SPLITS:
            part = seq.select_rows(rows, task, split)
            if len(part):
                _write_part(part, root / "examples" / task / split, part["event_id"])
    users = seq.select_rows(batch, "user")
    if len(users):
        _write_part(users, root / USERS_PARTS, users["user_id"])
    return seq.count_by(batch.select(["row_kind", "split", "ts"]), ["row_kind", "split"])


def _write_part(table: pa.Table, folder: Path, ids: pa.ChunkedArray) -> None:
    digest = hashlib.blake2b("\x1f".join(ids.to_pylist()).encode(), digest_size=10).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".part-{digest}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / f"part-{digest}.parquet")


def _finish_outputs(out: Path) -> None:
    """Every split folder gets a file (an empty one keeps the schema); user parts become users.parquet."""
    for task in TASKS:
        for split in seq.SPLITS:
            folder = out / "examples" / task / split
            folder.mkdir(parents=True, exist_ok=True)
            if not any(folder.glob("*.parquet")):
                pq.write_table(seq.EXAMPLE_SCHEMA[task].empty_table(), folder / "empty.parquet")
    parts = sorted((out / USERS_PARTS).glob("*.parquet")) if (out / USERS_PARTS).is_dir() else []
    with pq.ParquetWriter(str(out / "users.parquet"), seq.USERS_SCHEMA) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part).cast(seq.USERS_SCHEMA))
    if (out / USERS_PARTS).exists():
        shutil.rmtree(out / USERS_PARTS)


def build_features(config: FeaturesConfig) -> dict:
    """Build the features folder of docs/DATA.md section 3 from an event log; returns the manifest.

    Needs Ray (call lsvcr.ray_runtime.init_ray() first; it is started here if it is not).
    """
    import ray
    from ray.data.expressions import col

    from lsvcr.ray_runtime import init_ray

    started = _STARTED[0] = time.time()
    eventlog, out = Path(config.eventlog), Path(config.out)
    if not eventlog.is_dir():
        raise FileNotFoundError(f"event log folder {eventlog} does not exist")
    if not any((eventlog / t).is_dir() for t in seq.EVENTLOG_SCHEMA):
        raise FileNotFoundError(f"{eventlog} holds none of the event-log tables {list(seq.EVENTLOG_SCHEMA)}")
    init_ray()
    _prepare_out(out)

    # Catalogs: small enough for the driver, and their order defines the dense indices.
    videos = seq.index_videos(read_catalog(eventlog, "videos"))
    comments, comments_unknown_video = seq.index_comments(read_catalog(eventlog, "comments"), videos)
    pq.write_table(videos, out / "videos.parquet")
    pq.write_table(comments, out / "comments.parquet")
    _log(f"catalog: {len(videos)} videos, {len(comments)} comments ({comments_unknown_video} under unknown videos)")

    embed = {"encoder": config.encoder, "dim": config.encoder_dim, "batch_size": config.embed_batch_size,
             "concurrency": config.embed_concurrency, "device": config.embed_device, "threads": config.embed_threads}
    embed_start = time.time()
    dim = embed_texts(videos["text"].to_pylist(), out / "video_emb.npy", label="video texts", **embed)
    embed_texts(comments["text"].to_pylist(), out / "comment_emb.npy", label="comment texts", **embed)
    embed_s = time.time() - embed_start
    _log(f"embeddings: dim {dim}, {len(videos) + len(comments)} texts in {embed_s:.1f}s")

    # Events -> interaction rows keyed by video_idx.
    parts = []
    video_files = eventlog_files(eventlog, "video_events")
    if video_files:
        parts.append(ray.data.read_parquet(video_files).map_batches(
            seq.video_event_rows, batch_format="pyarrow",
            fn_kwargs={"video_ids": videos["video_id"].combine_chunks(),
                       "positive_actions": list(config.positive_video_actions)}))
    comment_files = eventlog_files(eventlog, "comment_events")
    if comment_files:
        parts.append(ray.data.read_parquet(comment_files).map_batches(
            seq.comment_event_rows, batch_format="pyarrow",
            fn_kwargs={"comment_ids": comments["comment_id"].combine_chunks(),
                       "comment_video_idx": comments["video_idx"].to_numpy(),
                       "positive_actions": list(config.positive_comment_actions)}))
    events = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize() if parts else None
    status = {k: v["count"] for k, v in _counts(events, ["kind", "status"]).items()} if events is not None else {}
    n_ok = status.get((seq.KIND_VIDEO_EVENT, "ok"), 0) + status.get((seq.KIND_COMMENT_EVENT, "ok"), 0)
    _log(f"events: {sum(status.values())} read, {n_ok} used; by (kind, status): {sorted(status.items())}")

    stats: dict[tuple, dict] = {}
    if n_ok:
        ok = events.filter(expr=col("status") == "ok")
        interactions = ok.union(ray.data.from_arrow(seq.publication_rows(comments))) if len(comments) else ok
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        partitions = config.shuffle_partitions or min(256, max(cpus, math.ceil((n_ok + len(comments)) / 500_000)))
        # Stage A, per video: hot comments and comment candidates as of each event.
        annotated = interactions.groupby("video_idx", num_partitions=partitions).map_groups(
            seq.annotate_video_group, batch_format="pyarrow",
            fn_kwargs={"num_negatives": config.num_negatives, "seed": config.seed})
        # Stage B, per user: histories, examples, splits, and the end-of-log histories for serving.
        rows = annotated.groupby("user_id", num_partitions=partitions).map_groups(
            seq.user_rows, batch_format="pyarrow", fn_kwargs={"max_history": config.max_history})
        # Video negatives, then every split written in the same pass.
        written = rows.map_batches(
            write_parts, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"out": str(out), "video_ts": videos["ts"].to_numpy(), "num_negatives": config.num_negatives,
                       "seed": config.seed, "window_ms": config.negative_window_ms})
        stats = seq.merge_counts(written.take_all(), ["row_kind", "split"])
    _finish_outputs(out)
    for task in TASKS:
        for split in seq.SPLITS:
            _log(f"wrote examples/{task}/{split}: {stats.get((task, split), {}).get('count', 0)} examples")
    _log(f"wrote users.parquet: {stats.get(('user', ''), {}).get('count', 0)} users")

    empty_range = {"count": 0, "ts_min": None, "ts_max": None}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "eventlog": str(eventlog),
        "num_videos": len(videos),
        "num_comments": len(comments),
        "num_users": stats.get(("user", ""), {}).get("count", 0),
        "max_history": config.max_history,
        "num_negatives": config.num_negatives,
        "comments_per_record": seq.COMMENTS_PER_RECORD,
        "seed": config.seed,
        "negative_window_ms": config.negative_window_ms,
        "positive_video_actions": list(config.positive_video_actions),
        "positive_comment_actions": list(config.positive_comment_actions),
        "encoder": config.encoder,
        "embedding_dim": dim,
        "split_policy": "per user and task, over examples with a non-empty history, by (ts, event_id): "
                        "n>=3 last test, second last valid, rest train; n=2 train, test; n=1 train",
        "tasks": {task: {split: stats.get((task, split), empty_range) for split in seq.SPLITS} for task in TASKS},
        "events": {
            "video_events": sum(v for (k, _), v in status.items() if k == seq.KIND_VIDEO_EVENT),
            "comment_events": sum(v for (k, _), v in status.items() if k == seq.KIND_COMMENT_EVENT),
            "video_events_used": status.get((seq.KIND_VIDEO_EVENT, "ok"), 0),
            "comment_events_used": status.get((seq.KIND_COMMENT_EVENT, "ok"), 0),
            "video_events_not_positive": status.get((seq.KIND_VIDEO_EVENT, "not_used"), 0),
            "comment_events_not_used": status.get((seq.KIND_COMMENT_EVENT, "not_used"), 0),
        },
        "dropped": {
            "comments_unknown_video": comments_unknown_video,
            "video_events_unknown_video": status.get((seq.KIND_VIDEO_EVENT, "unknown_video"), 0),
            "comment_events_unknown_comment": status.get((seq.KIND_COMMENT_EVENT, "unknown_comment"), 0),
            "video_examples_empty_history": stats.get(("video", "dropped"), {}).get("count", 0),
            "comment_examples_empty_history": stats.get(("comment", "dropped"), {}).get("count", 0),
        },
        "config": asdict(config),
        "build_s": round(time.time() - started, 3),
        "embed_s": round(embed_s, 3),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list) + "\n")
    _log(f"done: {json.dumps(manifest['tasks'])}")
    return manifest
