"""`lsvcr features build`: event log (docs/DATA.md section 2) -> features folder (section 3) with Ray Data.

    catalogs (pyarrow, driver) -> videos.parquet, comments.parquet, video_emb.npy, comment_emb.npy
    events (read_parquet, a few tasks) -> interaction rows -> OUT/_shuffle/video/p=<k>/ (video_idx mod P)
    one task per video partition: hot comments, comment candidates -> OUT/_shuffle/user/p=<k>/ (user hash mod P)
    one task per user partition: histories, examples, splits, video negatives -> examples/<task>/<split>/
    users.parquet, manifest.json

The two regroupings go through partition files, not Ray Data's groupby: its per-group hash shuffle (aggregator
actors, many small blocks) cost several times the work itself on 2 cores. Each partition task runs the pure
per-group functions over its groups in one process, so the work spreads over P = max(CPUs, rows / 250k) tasks
and a task's memory is bounded by its partition's rows.

Watermark: with lateness_ms = L, only events at or before cut = (latest event ts) - L are used; the rest wait
for a later build. An incremental build (incremental=true) keeps its state in OUT/_state (cut, files read,
catalog digest, annotated history rows) and, when new event-log files arrive, computes only the examples
with old cut < ts <= new cut: stage A over the videos those events touch, stage B over the users they
belong to. It falls back to a full rebuild when the state is missing or was built with another config, when
a new file holds an event (or a catalog item) at or before the old cut (later than the lateness bound), or
when the catalog order changed. Either way the rows equal a full rebuild's.

Storage: EVENTLOG and OUT may be URIs (core/storage.py: s3://, gs://, ...). The event log is read through
its URI's file system. With OUT a URI, the build runs in a local staging folder (<cache>/features-staging/,
its Ray tasks pinned to the driver's node, since they write there) and the folder is then uploaded with
manifest.json last, the marker of a complete folder (storage.upload_dir). An incremental build starts from the
remote folder (downloaded into staging unless staging already holds that very build) and sends only what
changed: part files are named by a hash of their rows' ids, so in an extending build an existing part is the
same part.

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

from core import storage
from core.config import ConfigError
from core.contract import COMMENTS_PER_RECORD, EXAMPLE_SCHEMA, SPLITS, TASKS, USERS_SCHEMA, VIDEO_PROTOCOLS
from core.paths import cache_dir
from core.runtime import init_ray
from features import sequences as seq
from features.embeddings import check_encoder_name, embed_texts
from ingestion.schema import COMMENT_ACTIONS, POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS, VIDEO_ACTIONS

# Positive events that are not examples, by (task, the split stage B gives them) -> their manifest "dropped" key.
NOT_EXAMPLES = {("video", "dropped"): "video_examples_empty_history",
                ("comment", "dropped"): "comment_examples_empty_history",
                ("comment", "unrankable"): "comment_examples_target_not_yet_published"}
SCHEMA_VERSION = 2  # 2: comment events whose comment was not published before them are not examples
USERS_PARTS = "_users_parts"  # user rows written by the workers, merged into users.parquet at the end
SHUFFLE = "_shuffle"  # partition files between the stages of one build, removed at its end
# Rows per partition of the stages: a partition is one task, and its tables stay well under a GB.
ROWS_PER_PARTITION = 250_000
STATE = "_state"  # incremental state: state.json and annotated/ (history rows at or before the cut)
# Config fields that change rows: a state built with other values cannot be extended.
ROW_FIELDS = ("max_history", "num_negatives", "seed", "video_protocol", "negative_window_ms", "positive_video_actions",
              "positive_comment_actions", "split", "split_valid_ts", "split_test_ts", "lateness_ms")


@dataclass
class FeaturesConfig:
    eventlog: str  # a folder or a URI (s3://bucket/eventlog)
    out: str  # a folder or a URI: built in a local staging folder, then uploaded (module docstring)
    max_history: int = 50
    num_negatives: int = 99
    seed: int = 0
    # Video-task candidate protocol of the `negatives` column (VIDEO_PROTOCOLS); every protocol's list is
    # written too (negatives_<protocol>), so evaluation can report several from one build.
    video_protocol: str = "alive_window"
    # W of alive_window: negatives published in [ts - W, ts). 0: the smallest window that holds at least
    # num_negatives + 1 videos for every event that has that many before it (seq.alive_window_ms).
    negative_window_ms: int = 0
    positive_video_actions: tuple[str, ...] = tuple(sorted(POSITIVE_VIDEO_ACTIONS))
    positive_comment_actions: tuple[str, ...] = tuple(sorted(POSITIVE_COMMENT_ACTIONS))
    encoder: str = "minilm"
    encoder_dim: int = 64  # only for encoders whose size is free (hash)
    embed_batch_size: int = 256
    embed_concurrency: int = 1
    embed_device: str = "cpu"
    embed_threads: int = 0  # torch threads per encoder actor; 0: the machine's cores / embed_concurrency
    shuffle_partitions: int = 0  # stage partitions (tasks per stage); 0: from the number of rows and CPUs
    # Run every task on the driver's node: for an event log or out folder that only this node has (the
    # continuous job's). Always so when out is a URI, since the build then writes to a local staging folder.
    on_driver_node: bool = False
    # Embedding cache by content hash, per encoder (a local folder: each node keeps its own);
    # "" = <lsvcr cache dir>/embeddings, "off" = no cache.
    embed_cache: str = ""
    # Splits: "leave_last_out" (per user and task) or "global_time" (one cut for everyone). The global cut is
    # split_valid_ts / split_test_ts when both are > 0, else the quantiles split_valid_frac / split_test_frac
    # of the used positive events' times.
    split: str = "leave_last_out"
    split_valid_frac: float = 0.1
    split_test_frac: float = 0.1
    split_valid_ts: int = 0
    split_test_ts: int = 0
    # Watermark: events later than (latest event ts - lateness_ms) wait for the next build.
    lateness_ms: int = 0
    incremental: bool = False

    def __post_init__(self):
        if not self.eventlog or not self.out:
            raise ConfigError("FeaturesConfig: eventlog and out are required")
        if _same_location(self.eventlog, self.out):
            raise ConfigError("FeaturesConfig: out must differ from eventlog")
        if self.embed_cache not in ("", "off") and not storage.is_local(self.embed_cache):
            raise ConfigError(f"FeaturesConfig.embed_cache: {self.embed_cache!r} is a URI; the embedding cache is "
                              "read and written row by row on the driver, so it must be a local folder")
        for name in ("max_history", "embed_batch_size", "embed_concurrency", "encoder_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FeaturesConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_negatives", "negative_window_ms", "embed_threads", "shuffle_partitions", "lateness_ms",
                     "split_valid_ts", "split_test_ts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FeaturesConfig.{name} must be >= 0, got {getattr(self, name)}")
        self.positive_video_actions = tuple(self.positive_video_actions)
        self.positive_comment_actions = tuple(self.positive_comment_actions)
        for name, known in (("positive_video_actions", VIDEO_ACTIONS), ("positive_comment_actions", COMMENT_ACTIONS)):
            actions = getattr(self, name)
            bad = sorted(set(actions) - set(known))
            if bad or not actions:
                raise ConfigError(f"FeaturesConfig.{name}: {list(actions)} must be a non-empty subset of {sorted(known)}")
        try:
            check_encoder_name(self.encoder)
        except ValueError as err:
            raise ConfigError(f"FeaturesConfig.encoder: {err}") from None
        if self.split not in seq.SPLIT_POLICIES:
            raise ConfigError(f"FeaturesConfig.split: expected one of {seq.SPLIT_POLICIES}, got {self.split!r}")
        fracs = (self.split_valid_frac, self.split_test_frac)
        if min(fracs) < 0 or sum(fracs) >= 1:
            raise ConfigError(f"FeaturesConfig.split_valid_frac + split_test_frac must be in [0, 1), got {fracs}")
        if self.split_valid_ts > self.split_test_ts:
            raise ConfigError("FeaturesConfig.split_valid_ts must be <= split_test_ts")
        if self.incremental and not (self.split == "global_time" and self.split_test_ts > 0):
            # Leave-last-out and quantile cuts move as data arrives, which would change rows already written.
            raise ConfigError("FeaturesConfig.incremental needs split=global_time with split_valid_ts and "
                              "split_test_ts set")
        if self.video_protocol not in VIDEO_PROTOCOLS:
            raise ConfigError(f"FeaturesConfig.video_protocol: expected one of {VIDEO_PROTOCOLS}, "
                              f"got {self.video_protocol!r}")
        if self.incremental and self.negative_window_ms == 0:
            # The automatic window moves as data arrives, which would change rows already written.
            raise ConfigError("FeaturesConfig.incremental needs negative_window_ms > 0 (a fixed alive window)")
        if self.embed_device != "cpu" and not self.embed_device.startswith("cuda"):
            raise ConfigError(f"FeaturesConfig.embed_device: expected cpu or cuda[:n], got {self.embed_device!r}")


def _same_location(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return storage.local_path(a).resolve() == storage.local_path(b).resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")


_STARTED = [time.time()]


def _log(message: str) -> None:
    print(f"features [{time.time() - _STARTED[0]:7.1f}s]: {message}", flush=True)


def eventlog_files(eventlog: str | Path, table: str) -> list[str]:
    """Every visible Parquet file under EVENTLOG/<table>/, flat or in hive-style partitions (date=.../), as
    paths inside the event log's file system (storage.filesystem; absolute paths when it is local).

    Writers keep temporary files hidden: names (of files or folders) starting with "." or "_" are skipped.
    """
    _, folder = storage.filesystem(storage.join(eventlog, table))
    return sorted(f"{folder}/{name}" for name in storage.list_files(storage.join(eventlog, table))
                  if name.endswith(".parquet") and not any(part.startswith((".", "_")) for part in name.split("/")))


def read_catalog(eventlog: str | Path, table: str) -> pa.Table:
    schema = seq.EVENTLOG_SCHEMA[table]
    files = eventlog_files(eventlog, table)
    if not files:
        return schema.empty_table()
    fs, _ = storage.filesystem(eventlog)
    return pa.concat_tables([pq.read_table(f, filesystem=fs).select(schema.names).cast(schema) for f in files])


def _prepare_out(out: Path) -> None:
    """Remove what an earlier build left, so a rerun never mixes old and new files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("examples", USERS_PARTS, STATE):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in ("videos.parquet", "comments.parquet", "video_emb.npy", "comment_emb.npy", "video_emb.parquet",
                 "comment_emb.parquet", "users.parquet", "manifest.json"):
        if (out / name).exists():
            (out / name).unlink()


def write_parts(batch: pa.Table, out: str, video_ts: np.ndarray, num_negatives: int, seed: int,
                window_ms: int, protocol: str = "alive_window", interaction_ts: np.ndarray | None = None,
                interaction_video: np.ndarray | None = None) -> pa.Table:
    """Ray Data sink for stage B's output: add video negatives (every protocol; `negatives` is `protocol`'s;
    interaction_ts / interaction_video are the used positive video events, for popularity_at_t), write each (task, split) slice of the batch
    and its user rows as Parquet files, and return the batch's row counts (count_by) for the manifest.

    One pass writes every split (a scan per split costs seconds of scheduling each). A file's name is a hash
    of its rows' ids, so a retried task overwrites its own file instead of adding a copy.
    """
    root = Path(out)
    video_rows = batch.filter(pa.compute.equal(batch["row_kind"], "video"))
    with_negatives = {"video": seq.add_video_negatives(video_rows, video_ts, num_negatives, seed, window_ms,
                                                       protocol, interaction_ts, interaction_video)}
    for task in TASKS:
        rows = with_negatives.get(task, batch)
        for split in SPLITS:
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


def _finish_outputs(out: Path, keep_old_users: bool = False) -> None:
    """Every split folder gets a file (an empty one keeps the schema); user parts become users.parquet (with
    keep_old_users, the old users.parquet's rows of users that got no new row are kept)."""
    for task in TASKS:
        for split in SPLITS:
            folder = out / "examples" / task / split
            folder.mkdir(parents=True, exist_ok=True)
            if not any(folder.glob("*.parquet")):
                pq.write_table(EXAMPLE_SCHEMA[task].empty_table(), folder / "empty.parquet")
    parts = sorted((out / USERS_PARTS).glob("*.parquet")) if (out / USERS_PARTS).is_dir() else []
    new = [pq.read_table(part).cast(USERS_SCHEMA) for part in parts]
    old = pq.read_table(out / "users.parquet") if keep_old_users and (out / "users.parquet").exists() else None
    if old is not None and new:
        updated = pa.concat_tables([t.select(["user_id"]) for t in new])["user_id"]
        old = old.filter(pa.compute.invert(pa.compute.is_in(old["user_id"], value_set=updated.combine_chunks())))
    tmp = out / ".users.parquet.tmp"
    with pq.ParquetWriter(str(tmp), USERS_SCHEMA) as writer:
        if old is not None:
            writer.write_table(old.cast(USERS_SCHEMA))
        for table in new:
            writer.write_table(table)
    os.replace(tmp, out / "users.parquet")
    if (out / USERS_PARTS).exists():
        shutil.rmtree(out / USERS_PARTS)


def _digest(ids: list[str]) -> str:
    return hashlib.blake2b("\x1f".join(ids).encode(), digest_size=16).hexdigest()


def _row_config(config: FeaturesConfig) -> dict:
    return json.loads(json.dumps({name: getattr(config, name) for name in ROW_FIELDS}, default=list))


def _load_state(out: Path, config: FeaturesConfig, files: dict[str, list[str]], videos: pa.Table,
                comments: pa.Table, eventlog_fs) -> tuple[dict | None, str]:
    """The previous build's state when this build may extend it, else (None, why not)."""
    path = out / STATE / "state.json"
    if not path.exists() or not (out / "manifest.json").exists():
        return None, "no earlier incremental build"
    state = json.loads(path.read_text())
    if state.get("row_config") != _row_config(config) or state.get("schema_version") != SCHEMA_VERSION:
        return None, "the earlier build used another config"
    for table, n_key in (("videos", "video_id"), ("comments", "comment_id")):
        catalog = videos if table == "videos" else comments
        n_old = state["catalog"][table]["count"]
        ids = catalog[n_key].to_pylist()
        if len(ids) < n_old or _digest(ids[:n_old]) != state["catalog"][table]["digest"]:
            return None, f"the {table} catalog order changed"
        if len(ids) > n_old and pa.compute.min(catalog["ts"].slice(n_old)).as_py() <= state["cut_ts"]:
            return None, f"new {table} at or before the old cut {state['cut_ts']}"
    seen = set(state["files"])
    for table in ("video_events", "comment_events"):
        for f in files[table]:
            if f not in seen and pa.compute.min(pq.read_table(f, columns=["ts"], filesystem=eventlog_fs)["ts"]).as_py() \
                    <= state["cut_ts"]:
                return None, f"{f} holds events at or before the old cut {state['cut_ts']} (beyond the lateness bound)"
    return state, ""


def build_features(config: FeaturesConfig) -> dict:
    """Build the features folder of docs/DATA.md section 3 from an event log; returns the manifest.

    Needs Ray (call core.runtime.init_ray() first; it is started here if it is not).
    """
    if storage.is_local(config.out):
        return _build(config, storage.local_path(config.out), pin=config.on_driver_node)

    staging = cache_dir() / "features-staging" / hashlib.sha256(config.out.rstrip("/").encode()).hexdigest()[:16]
    prepare_staging(staging, config.out, config.incremental)
    manifest = _build(config, staging, pin=True)
    extended = manifest["mode"] == "incremental"
    sent = storage.upload_dir(staging, config.out, "manifest.json", unchanged=lambda name: extended and _is_part(name))
    _log(f"uploaded {len(sent)} files to {config.out} (manifest.json last)")
    return manifest


def _is_part(name: str) -> bool:
    """A part file named by the hash of its rows' ids (write_parts, _stage_a): in an extending build, a part
    that exists remotely under that name holds the same rows."""
    return name.rsplit("/", 1)[-1].startswith("part-") and name.endswith(".parquet")


def prepare_staging(staging: Path, uri: str, incremental: bool) -> None:
    """The local folder a build for `uri` runs in. A full build starts empty; an incremental one starts from
    the remote folder, downloaded unless staging already holds that very build (same manifest.json)."""
    if incremental:
        try:
            remote = storage.read_text(storage.join(uri, "manifest.json"))
        except FileNotFoundError:
            remote = None  # nothing complete there: a full build follows
        local = staging / "manifest.json"
        if remote is not None and local.is_file() and local.read_text() == remote:
            return
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if incremental and remote is not None:
        storage.download_dir(uri, staging)


def _build(config: FeaturesConfig, out: Path, pin: bool) -> dict:
    """The build into local folder `out`. pin: run the tasks that read the event log or write into `out` on
    this node (a staging folder, or folders, that only this node has)."""
    import ray

    started = _STARTED[0] = time.time()
    eventlog = config.eventlog
    if storage.kind(eventlog) != "dir":
        raise FileNotFoundError(f"event log folder {eventlog} does not exist")
    if not any(storage.kind(storage.join(eventlog, t)) == "dir" for t in seq.EVENTLOG_SCHEMA):
        raise FileNotFoundError(f"{eventlog} holds none of the event-log tables {list(seq.EVENTLOG_SCHEMA)}")
    init_ray()
    eventlog_fs, _ = storage.filesystem(eventlog)
    files = {t: eventlog_files(eventlog, t) for t in seq.EVENTLOG_SCHEMA}
    remote_args = {}
    if pin:  # every node has the resource "node:<its ip>"; a sliver of it keeps the tasks on this one
        remote_args["resources"] = {f"node:{ray.util.get_node_ip_address()}": 0.001}

    # Catalogs: small enough for the driver, and their order defines the dense indices.
    videos = seq.index_videos(read_catalog(eventlog, "videos"))
    comments, comments_unknown_video = seq.index_comments(read_catalog(eventlog, "comments"), videos)
    state, why = _load_state(out, config, files, videos, comments, eventlog_fs) if config.incremental else (None, "")
    if config.incremental and state is None:
        _log(f"full rebuild: {why}")
    if state is None:
        _prepare_out(out)
    after = state["cut_ts"] if state else None  # examples at or before it were written by an earlier build
    pq.write_table(videos, out / "videos.parquet")
    pq.write_table(comments, out / "comments.parquet")
    _log(f"catalog: {len(videos)} videos, {len(comments)} comments ({comments_unknown_video} under unknown videos)")

    cache = None if config.embed_cache == "off" else (config.embed_cache or str(cache_dir() / "embeddings"))
    embed = {"encoder": config.encoder, "dim": config.encoder_dim, "batch_size": config.embed_batch_size,
             "concurrency": config.embed_concurrency, "device": config.embed_device, "threads": config.embed_threads,
             "cache_dir": cache}
    embed_start = time.time()
    embed_stats = {"video": {}, "comment": {}}
    dim = embed_texts(videos["text"].to_pylist(), out / "video_emb.npy", label="video texts",
                      ids=videos["video_id"].to_pylist(), stats=embed_stats["video"], **embed)
    embed_texts(comments["text"].to_pylist(), out / "comment_emb.npy", label="comment texts",
                ids=comments["comment_id"].to_pylist(), stats=embed_stats["comment"], **embed)
    embed_s = time.time() - embed_start
    _log(f"embeddings: dim {dim}, {len(videos) + len(comments)} texts in {embed_s:.1f}s")

    # Events -> interaction rows, written as partition files by video (a shuffle through the output folder:
    # a handful of big tasks instead of Ray's per-group shuffle, which costs more than the work on 2 cores).
    shuffle = out / SHUFFLE
    if shuffle.exists():
        shutil.rmtree(shuffle)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_rows = sum(pq.ParquetFile(f, filesystem=eventlog_fs).metadata.num_rows
                 for t in ("video_events", "comment_events") for f in files[t])
    partitions = config.shuffle_partitions or min(256, max(cpus, math.ceil((n_rows + len(comments)) / ROWS_PER_PARTITION)))
    parts = []
    for table, kwargs in (
        ("video_events", {"video_ids": videos["video_id"].combine_chunks(),
                          "positive_actions": list(config.positive_video_actions)}),
        ("comment_events", {"comment_ids": comments["comment_id"].combine_chunks(),
                            "comment_video_idx": comments["video_idx"].to_numpy(),
                            "positive_actions": list(config.positive_comment_actions)}),
    ):
        if files[table]:
            # A few read tasks of many files each: a task per small date file costs more than it reads.
            read = ray.data.read_parquet(files[table], partitioning=None, filesystem=eventlog_fs,
                                         override_num_blocks=min(len(files[table]), partitions),
                                         ray_remote_args=remote_args)
            parts.append(read.map_batches(
                _events_to_partitions, batch_format="pyarrow", batch_size=None,
                fn_kwargs={"table": table, "out": str(out), "partitions": partitions, "row_kwargs": kwargs},
                **remote_args))
    counted = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).take_all() if parts else []
    by_status = seq.merge_counts(counted, ["kind", "status"])
    status = {k: v["count"] for k, v in by_status.items()}
    max_ts = max((v["ts_max"] for v in by_status.values()), default=None)
    cut = None if max_ts is None else int(max_ts) - config.lateness_ms
    n_ok = status.get((seq.KIND_VIDEO_EVENT, "ok"), 0) + status.get((seq.KIND_COMMENT_EVENT, "ok"), 0)
    _log(f"events: {sum(status.values())} read, {n_ok} used, {partitions} partitions; by (kind, status): "
         f"{sorted(status.items())}; cut {cut}" + (f", examples after {after} only (incremental)" if after is not None else ""))

    valid_ts, test_ts = config.split_valid_ts, config.split_test_ts
    window_ms = config.negative_window_ms  # 0: the automatic one, computed below from the used events
    stats: dict[tuple, dict] = {}
    if n_ok and (after is None or cut > after):
        used = None
        if (config.split == "global_time" and not test_ts) or after is not None:
            used = _read_columns(shuffle / "video", ["video_idx", "ts", "positive"])
            used = used.filter(pa.compute.and_(used["positive"], pa.compute.less_equal(used["ts"], cut)))
        if config.split == "global_time" and not test_ts:
            valid_ts, test_ts = seq.global_cuts(used["ts"].to_numpy(), config.split_valid_frac, config.split_test_frac)
        touched = None
        if after is not None:
            # Only videos with a positive event in the window need stage A (with their whole history).
            touched = pa.compute.unique(used.filter(pa.compute.greater(used["ts"], after))["video_idx"])
        publications = seq.publication_rows(comments)
        publications = publications.filter(pa.compute.less_equal(publications["ts"], cut))
        tasks = ray.data.from_items([{"part": k} for k in range(partitions)], override_num_blocks=partitions)
        # Stage A, per video: hot comments and comment candidates as of each event -> partition files by user.
        tasks.map_batches(
            _stage_a, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"out": str(out), "partitions": partitions, "cut": cut, "after": after, "touched": touched,
                       "publications": publications, "num_negatives": config.num_negatives, "seed": config.seed,
                       "incremental": config.incremental}, **remote_args).take_all()
        _log("stage A (hot comments, comment candidates) done")
        # popularity_at_t and the automatic alive window need every used positive video event (also the
        # earlier ones in an incremental build).
        pos = _read_columns(shuffle / "video", ["kind", "video_idx", "ts", "positive"])
        pos = pos.filter(pa.compute.and_(pa.compute.and_(pa.compute.equal(pos["kind"], seq.KIND_VIDEO_EVENT),
                                                         pos["positive"]), pa.compute.less_equal(pos["ts"], cut)))
        pos_ts, pos_video = pos["ts"].to_numpy(), pos["video_idx"].to_numpy()
        window_ms = window_ms or seq.alive_window_ms(videos["ts"].to_numpy(), pos_ts, config.num_negatives)
        _log(f"video candidates: protocol {config.video_protocol}, alive window {window_ms / 3_600_000:.2f} h")
        # Stage B, per user: histories, examples, splits, users as of the cut; then video negatives and the
        # written files (write_parts).
        written = tasks.map_batches(
            _stage_b, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"out": str(out), "after": after,
                       "user_kwargs": {"max_history": config.max_history, "split": config.split, "valid_ts": valid_ts,
                                       "test_ts": test_ts, "emit_after_ts": after},
                       "write_kwargs": {"out": str(out), "video_ts": videos["ts"].to_numpy(),
                                        "num_negatives": config.num_negatives, "seed": config.seed,
                                        "window_ms": window_ms, "protocol": config.video_protocol,
                                        "interaction_ts": pos_ts, "interaction_video": pos_video}},
            **remote_args)
        stats = seq.merge_counts(written.take_all(), ["row_kind", "split"])
    if shuffle.exists():
        shutil.rmtree(shuffle)
    _finish_outputs(out, keep_old_users=after is not None)
    if after is not None:
        # Add the earlier builds' example counts: the window's rows came on top of them.
        old_manifest = json.loads((out / "manifest.json").read_text())
        for task, split in [(t, s) for t in TASKS for s in SPLITS] + list(NOT_EXAMPLES):
            prev = old_manifest["tasks"][task].get(split) if (task, split) not in NOT_EXAMPLES else {
                "count": old_manifest["dropped"][NOT_EXAMPLES[task, split]], "ts_min": None, "ts_max": None}
            if prev and prev["count"]:
                now = stats.setdefault((task, split), {"count": 0, "ts_min": prev["ts_min"], "ts_max": prev["ts_max"]})
                now["count"] += prev["count"]
                if prev["ts_min"] is not None:
                    now["ts_min"] = min(v for v in (now["ts_min"], prev["ts_min"]) if v is not None)
                    now["ts_max"] = max(v for v in (now["ts_max"], prev["ts_max"]) if v is not None)
    num_users = pq.ParquetFile(out / "users.parquet").metadata.num_rows
    for task in TASKS:
        for split in SPLITS:
            _log(f"examples/{task}/{split}: {stats.get((task, split), {}).get('count', 0)} examples")
    _log(f"users.parquet: {num_users} users")

    empty_range = {"count": 0, "ts_min": None, "ts_max": None}
    if config.split == "leave_last_out":
        split_policy = ("leave_last_out: per user and task, over examples with a non-empty history, by "
                        "(ts, event_id): n>=3 last test, second last valid, rest train; n=2 train, test; n=1 train")
    else:
        split_policy = f"global_time: ts < {valid_ts} train, ts < {test_ts} valid, else test"
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "eventlog": str(eventlog),
        "mode": "incremental" if after is not None else "full",
        "cut_ts": cut,
        "previous_cut_ts": after,
        "lateness_ms": config.lateness_ms,
        "num_videos": len(videos),
        "num_comments": len(comments),
        "num_users": num_users,
        "max_history": config.max_history,
        "num_negatives": config.num_negatives,
        "comments_per_record": COMMENTS_PER_RECORD,
        "seed": config.seed,
        "negative_window_ms": config.negative_window_ms,
        "video_protocol": config.video_protocol,
        "video_protocols": list(VIDEO_PROTOCOLS),
        # The W used by alive_window (the automatic one when negative_window_ms is 0), and how it was chosen.
        "alive_window_ms": window_ms,
        "alive_window_rule": ("configured" if config.negative_window_ms else
                              f"smallest W such that every used positive video event with at least "
                              f"{config.num_negatives + 1} videos published before it has that many in [ts - W, ts)"),
        "positive_video_actions": list(config.positive_video_actions),
        "positive_comment_actions": list(config.positive_comment_actions),
        "encoder": config.encoder,
        "embedding_dim": dim,
        "embeddings": {"cache": cache, **{f"{k}_{n}": v for k, d in embed_stats.items() for n, v in d.items()}},
        "split": config.split,
        "split_valid_ts": valid_ts if config.split == "global_time" else None,
        "split_test_ts": test_ts if config.split == "global_time" else None,
        "split_policy": split_policy,
        "tasks": {task: {split: stats.get((task, split), empty_range) for split in SPLITS} for task in TASKS},
        "events": {
            "video_events": sum(v for (k, _), v in status.items() if k == seq.KIND_VIDEO_EVENT),
            "comment_events": sum(v for (k, _), v in status.items() if k == seq.KIND_COMMENT_EVENT),
            "video_events_used": status.get((seq.KIND_VIDEO_EVENT, "ok"), 0),
            "comment_events_used": status.get((seq.KIND_COMMENT_EVENT, "ok"), 0),
            "video_events_not_positive": status.get((seq.KIND_VIDEO_EVENT, "not_used"), 0),
            "comment_events_not_used": status.get((seq.KIND_COMMENT_EVENT, "not_used"), 0),
            "ts_max": max_ts,
        },
        "dropped": {
            "comments_unknown_video": comments_unknown_video,
            "video_events_unknown_video": status.get((seq.KIND_VIDEO_EVENT, "unknown_video"), 0),
            "comment_events_unknown_comment": status.get((seq.KIND_COMMENT_EVENT, "unknown_comment"), 0),
            **{key: stats.get(task_split, {}).get("count", 0) for task_split, key in NOT_EXAMPLES.items()},
        },
        "config": asdict(config),
        "build_s": round(time.time() - started, 3),
        "embed_s": round(embed_s, 3),
    }
    if config.incremental and cut is not None:
        (out / STATE).mkdir(exist_ok=True)
        state_json = {"schema_version": SCHEMA_VERSION, "row_config": _row_config(config),
                      "cut_ts": cut if after is None else max(cut, after),
                      "files": [f for table in ("video_events", "comment_events") for f in files[table]],
                      "catalog": {"videos": {"count": len(videos), "digest": _digest(videos["video_id"].to_pylist())},
                                  "comments": {"count": len(comments),
                                               "digest": _digest(comments["comment_id"].to_pylist())}}}
        storage.write_text(str(out / STATE / "state.json"), json.dumps(state_json, indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list) + "\n")
    _log(f"done: {json.dumps(manifest['tasks'])}")
    return manifest


def _partition_of(keys: pa.ChunkedArray, partitions: int) -> np.ndarray:
    """Partition number of each key, the same in every process: ints modulo P, strings by pandas' fixed-key hash."""
    if pa.types.is_integer(keys.type):
        return np.asarray(keys.to_numpy(), np.int64) % partitions
    import pandas as pd

    values = np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object)
    return (pd.util.hash_array(values) % np.uint64(partitions)).astype(np.int64)


def _write_partitions(table: pa.Table, folder: Path, key: str, partitions: int) -> None:
    """Split `table` by partition of `key` into folder/p=<k>/part-<hash of event ids>.parquet."""
    part = _partition_of(table[key], partitions)
    for k in np.unique(part).tolist():
        rows = table.filter(pa.array(part == k))
        _write_part(rows, folder / f"p={k}", rows["event_id"])


def _read_columns(folder: Path, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Every part file under folder (recursively), concatenated; empty when there is none."""
    files = sorted(p for p in folder.rglob("part-*.parquet")) if folder.is_dir() else []
    tables = [pq.read_table(f, columns=columns) for f in files]
    if schema is not None:
        tables = [t.cast(schema) for t in tables]
        return pa.concat_tables(tables) if tables else schema.empty_table()
    return pa.concat_tables(tables)


def _events_to_partitions(batch: pa.Table, table: str, out: str, partitions: int, row_kwargs: dict) -> pa.Table:
    """Ray Data map: one block of events -> interaction rows; the usable ones go to OUT/_shuffle/video/p=<k>/
    by video; returns count_by(kind, status) for the manifest and the watermark."""
    to_rows = seq.video_event_rows if table == "video_events" else seq.comment_event_rows
    rows = to_rows(batch, **row_kwargs)
    ok = rows.filter(pa.compute.equal(rows["status"], "ok"))
    if len(ok):
        _write_partitions(ok, Path(out) / SHUFFLE / "video", "video_idx", partitions)
    return seq.count_by(rows.select(["kind", "status", "ts"]), ["kind", "status"])


def _groups_apply(table: pa.Table, key: str, fn, schema: pa.Schema, **kwargs) -> pa.Table:
    outs = [fn(group, **kwargs) for group in seq.group_slices(table, key)]
    return pa.concat_tables(outs) if outs else schema.empty_table()


def _stage_a(batch: pa.Table, out: str, partitions: int, cut: int, after: int | None, touched: pa.Array | None,
             publications: pa.Table, num_negatives: int, seed: int, incremental: bool) -> pa.Table:
    """Ray Data map over partition numbers: stage A (annotate_video_group) on every video of the partition;
    the annotated rows go to OUT/_shuffle/user/p=<k>/ by user (and to the incremental state)."""
    root = Path(out)
    done = 0
    for k in batch["part"].to_pylist():
        events = _read_columns(root / SHUFFLE / "video" / f"p={k}", schema=seq.INTERACTION_SCHEMA)
        events = events.filter(pa.compute.less_equal(events["ts"], cut))
        pubs = publications.filter(pa.array(_partition_of(publications["video_idx"], partitions) == k))
        interactions = pa.concat_tables([events, pubs.cast(seq.INTERACTION_SCHEMA)])
        if touched is not None:
            interactions = interactions.filter(pa.compute.is_in(interactions["video_idx"], value_set=touched))
        annotated = _groups_apply(interactions, "video_idx", seq.annotate_video_group, seq.ANNOTATED_SCHEMA,
                                  num_negatives=num_negatives, seed=seed)
        if after is not None:
            annotated = annotated.filter(pa.compute.greater(annotated["ts"], after))
        if len(annotated):
            if incremental:
                # History rows for the next incremental build (its stage B needs every earlier event of a user).
                _write_part(seq.without_candidates(annotated), root / STATE / "annotated", annotated["event_id"])
            _write_partitions(annotated, root / SHUFFLE / "user", "user_id", partitions)
        done += len(annotated)
    return pa.table({"rows": [done]})


def _stage_b(batch: pa.Table, out: str, after: int | None, user_kwargs: dict, write_kwargs: dict) -> pa.Table:
    """Ray Data map over partition numbers: stage B (user_rows) on every user of the partition, with the
    earlier builds' history rows of those users (incremental), then write_parts; returns its counts."""
    root = Path(out)
    counts = []
    for k in batch["part"].to_pylist():
        history = _read_columns(root / SHUFFLE / "user" / f"p={k}", schema=seq.ANNOTATED_SCHEMA)
        if after is not None and len(history):
            old = _read_columns(root / STATE / "annotated", schema=seq.ANNOTATED_SCHEMA)
            users = pa.compute.unique(history["user_id"])
            keep = pa.compute.and_(pa.compute.less_equal(old["ts"], after),
                                   pa.compute.is_in(old["user_id"], value_set=users))
            history = pa.concat_tables([history, old.filter(keep)])
        rows = _groups_apply(history, "user_id", seq.user_rows, seq.USER_ROWS_SCHEMA, **user_kwargs)
        if len(rows):
            counts.append(write_parts(rows, **write_kwargs))
    return pa.concat_tables(counts) if counts else pa.table({
        "row_kind": pa.array([], pa.string()), "split": pa.array([], pa.string()), "ts_count": pa.array([], pa.int64()),
        "ts_min": pa.array([], pa.int64()), "ts_max": pa.array([], pa.int64())})
