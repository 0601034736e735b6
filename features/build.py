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

This file holds the entry point and the Ray wiring, one function per phase of `_build`. The settings are
FeaturesConfig (features/config.py), the feature logic pure functions (features/sequences.py lists them), the
partition tasks' bodies in features/partitions.py and the incremental state in features/incremental.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import contract, storage
from core.contract import SPLITS, TASKS
from core.paths import cache_dir
from core.runtime import init_ray
from features import partitions
from features.catalog import index_comments, index_videos
from features.config import ROW_FIELDS, FeaturesConfig
from features.embeddings import embed_texts
from features.incremental import EVENT_TABLES, STATE, load_state, save_state
from features.interactions import KIND_COMMENT_EVENT, KIND_VIDEO_EVENT, publication_rows
from features.negatives import alive_bounds, window_summary
from features.stage_b import global_cuts
from ingestion.schema import ARROW_SCHEMA, TABLES

# Positive events that are not examples, by (task, the split stage B gives them) -> their manifest "dropped" key.
NOT_EXAMPLES = {("video", "dropped"): "video_examples_empty_history",
                ("comment", "dropped"): "comment_examples_empty_history",
                ("comment", "unrankable"): "comment_examples_target_not_yet_published"}
SCHEMA_VERSION = 2  # 2: comment events whose comment was not published before them are not examples
# Rows per partition of the stages: a partition is one task, and its tables stay well under a GB.
ROWS_PER_PARTITION = 250_000


def _identity(config: FeaturesConfig) -> dict:
    """What an incremental state must match to be extended: the schema version and the fields that change rows."""
    row_config = json.loads(json.dumps({name: getattr(config, name) for name in ROW_FIELDS}, default=list))
    return {"schema_version": SCHEMA_VERSION, "row_config": row_config}


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
    schema = ARROW_SCHEMA[table]
    files = eventlog_files(eventlog, table)
    if not files:
        return schema.empty_table()
    fs, _ = storage.filesystem(eventlog)
    return pa.concat_tables([pq.read_table(f, filesystem=fs).select(schema.names).cast(schema) for f in files])


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
    sent = storage.upload_dir(staging, config.out, contract.MANIFEST,
                              unchanged=lambda name: extended and _is_part(name))
    _log(f"uploaded {len(sent)} files to {config.out} ({contract.MANIFEST} last)")
    return manifest


def _is_part(name: str) -> bool:
    """A part file named by the hash of its rows' ids (partitions.write_part): in an extending build, a part
    that exists remotely under that name holds the same rows."""
    return name.rsplit("/", 1)[-1].startswith("part-") and name.endswith(".parquet")


def prepare_staging(staging: Path, uri: str, incremental: bool) -> None:
    """The local folder a build for `uri` runs in. A full build starts empty; an incremental one starts from
    the remote folder, downloaded unless staging already holds that very build (same manifest.json)."""
    if incremental:
        try:
            remote = storage.read_text(storage.join(uri, contract.MANIFEST))
        except FileNotFoundError:
            remote = None  # nothing complete there: a full build follows
        local = staging / contract.MANIFEST
        if remote is not None and local.is_file() and local.read_text() == remote:
            return
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if incremental and remote is not None:
        storage.download_dir(uri, staging)


# ---------------------------------------------------------------------------------------------- the build


@dataclass
class _Run:
    """What the phases of one build share."""

    config: FeaturesConfig
    out: Path  # the local folder built into
    files: dict[str, list[str]]  # event-log table -> its files (eventlog_files)
    eventlog_fs: object  # the event log's pyarrow file system
    remote_args: dict  # Ray task options: pinned to this node, or none
    local: bool = False  # run the stages in this process (FeaturesConfig.local_max_events)


@dataclass
class _Stages:
    """What stages A and B leave for the manifest (their defaults: no example to build)."""

    window_ms: int  # W of alive_window (0: each event's own)
    valid_ts: int  # the global_time cuts
    test_ts: int
    stats: dict[tuple, dict] = field(default_factory=dict)  # (row_kind, split) -> count, ts_min, ts_max
    windows: dict = field(default_factory=dict)  # negatives.window_summary of the used positive video events


def _build(config: FeaturesConfig, out: Path, pin: bool) -> dict:
    """The build into local folder `out`. pin: run the tasks that read the event log or write into `out` on
    this node (a staging folder, or folders, that only this node has)."""
    import ray

    started = _STARTED[0] = time.time()
    if storage.kind(config.eventlog) != "dir":
        raise FileNotFoundError(f"event log folder {config.eventlog} does not exist")
    if not any(storage.kind(storage.join(config.eventlog, t)) == "dir" for t in TABLES):
        raise FileNotFoundError(f"{config.eventlog} holds none of the event-log tables {list(TABLES)}")
    init_ray()
    run = _Run(config, out, files={t: eventlog_files(config.eventlog, t) for t in TABLES},
               eventlog_fs=storage.filesystem(config.eventlog)[0],
               # every node has the resource "node:<its ip>"; a sliver of it keeps the tasks on this one
               remote_args={"resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}} if pin else {})

    # Catalogs: small enough for the driver, and their order defines the dense indices.
    videos = index_videos(read_catalog(config.eventlog, "videos"))
    comments, comments_unknown_video = index_comments(read_catalog(config.eventlog, "comments"), videos)
    after = _start_folder(run, videos, comments)  # examples at or before it were written by an earlier build
    pq.write_table(videos, out / contract.VIDEOS)
    pq.write_table(comments, out / contract.COMMENTS)
    _log(f"catalog: {len(videos)} videos, {len(comments)} comments ({comments_unknown_video} under unknown videos)")
    embedding = _embed_catalogs(run, videos, comments)

    n_events = sum(pq.ParquetFile(f, filesystem=run.eventlog_fs).metadata.num_rows
                   for t in EVENT_TABLES for f in run.files[t])
    run.local = 0 < n_events <= config.local_max_events
    num_partitions = _num_partitions(run, n_events, len(comments))
    status, ts_max = _events_to_partitions(run, videos, comments, num_partitions)
    cut = None if ts_max is None else int(ts_max) - config.lateness_ms
    n_ok = status.get((KIND_VIDEO_EVENT, "ok"), 0) + status.get((KIND_COMMENT_EVENT, "ok"), 0)
    _log(f"events: {sum(status.values())} read, {n_ok} used, {num_partitions} partitions; by (kind, status): "
         f"{sorted(status.items())}; cut {cut}"
         + (f", examples after {after} only (incremental)" if after is not None else ""))

    stages = _Stages(config.negative_window_ms, config.split_valid_ts, config.split_test_ts)
    if n_ok and (after is None or cut > after):
        stages = _run_stages(run, videos, comments, num_partitions, cut, after)
    if (out / partitions.SHUFFLE).exists():
        shutil.rmtree(out / partitions.SHUFFLE)
    partitions.finish_outputs(out, keep_old_users=after is not None)
    if after is not None:
        _add_earlier_counts(stages.stats, json.loads((out / contract.MANIFEST).read_text()))
    for task in TASKS:
        for split in SPLITS:
            _log(f"{contract.EXAMPLES}/{task}/{split}: {stages.stats.get((task, split), {}).get('count', 0)} examples")

    manifest = _manifest(run, started, cut, after, stages, embedding, status, ts_max,
                         catalog={"num_videos": len(videos), "num_comments": len(comments),
                                  "comments_unknown_video": comments_unknown_video})
    if config.incremental and cut is not None:
        save_state(out, _identity(config), cut if after is None else max(cut, after), run.files, videos, comments)
    (out / contract.MANIFEST).write_text(json.dumps(manifest, indent=2, default=list) + "\n")
    _log(f"done: {json.dumps(manifest['tasks'])}")
    return manifest


def _start_folder(run: _Run, videos: pa.Table, comments: pa.Table) -> int | None:
    """The cut of the earlier build this one extends (incremental, load_state), else None after removing
    what an earlier build left, so a rerun never mixes old and new files."""
    state, why = (load_state(run.out, _identity(run.config), run.files, videos, comments, run.eventlog_fs)
                  if run.config.incremental else (None, ""))
    if state is not None:
        return state["cut_ts"]
    if run.config.incremental:
        _log(f"full rebuild: {why}")
    run.out.mkdir(parents=True, exist_ok=True)
    for name in (contract.EXAMPLES, partitions.USERS_PARTS, STATE):
        if (run.out / name).exists():
            shutil.rmtree(run.out / name)
    for name in contract.TOP_LEVEL_FILES:
        if (run.out / name).exists():
            (run.out / name).unlink()
    return None


def _embed_catalogs(run: _Run, videos: pa.Table, comments: pa.Table) -> dict:
    """video_emb.npy and comment_emb.npy (features/embeddings.py); returns what the manifest says of them."""
    config = run.config
    cache = None if config.embed_cache == "off" else (config.embed_cache or str(cache_dir() / "embeddings"))
    embed = {"encoder": config.encoder, "dim": config.encoder_dim, "batch_size": config.embed_batch_size,
             "concurrency": config.embed_concurrency, "device": config.embed_device, "threads": config.embed_threads,
             "cache_dir": cache, "local_texts": config.embed_local_texts}
    started = time.time()
    stats = {"video": {}, "comment": {}}
    dim = embed_texts(videos["text"].to_pylist(), run.out / contract.VIDEO_EMB, label="video texts",
                      ids=videos["video_id"].to_pylist(), stats=stats["video"], **embed)
    embed_texts(comments["text"].to_pylist(), run.out / contract.COMMENT_EMB, label="comment texts",
                ids=comments["comment_id"].to_pylist(), stats=stats["comment"], **embed)
    seconds = time.time() - started
    _log(f"embeddings: dim {dim}, {len(videos) + len(comments)} texts in {seconds:.1f}s")
    return {"dim": dim, "cache": cache, "stats": stats, "seconds": seconds}


def _num_partitions(run: _Run, n_events: int, num_comments: int) -> int:
    """P: the configured number, else one partition per ROWS_PER_PARTITION rows, at least one per CPU."""
    import ray

    if run.config.shuffle_partitions:
        return run.config.shuffle_partitions
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return min(256, max(cpus, math.ceil((n_events + num_comments) / ROWS_PER_PARTITION)))


def _rows(tables: list[pa.Table]) -> list[dict]:
    """What take_all() returns for these result batches, for the stages run in this process."""
    return [row for table in tables for row in table.to_pylist()]


def _per_partition(run: _Run, num_partitions: int, fn, fn_kwargs: dict) -> list[dict]:
    """fn on each partition number (a one-row batch {"part": [k]}): one Ray Data task each, or in this process
    for a small build; the result rows of every call."""
    import ray

    if run.local:
        return _rows([fn(pa.table({"part": [k]}), **fn_kwargs) for k in range(num_partitions)])
    tasks = ray.data.from_items([{"part": k} for k in range(num_partitions)], override_num_blocks=num_partitions)
    return tasks.map_batches(fn, batch_format="pyarrow", batch_size=1, fn_kwargs=fn_kwargs,
                             **run.remote_args).take_all()


def _events_to_partitions(run: _Run, videos: pa.Table, comments: pa.Table,
                          num_partitions: int) -> tuple[dict[tuple, int], int | None]:
    """Events -> interaction rows, written as partition files by video (partitions.events_to_partitions);
    returns the events per (kind, status) and the latest event ts (None without events)."""
    import ray

    config, out = run.config, run.out
    if (out / partitions.SHUFFLE).exists():
        shutil.rmtree(out / partitions.SHUFFLE)
    row_kwargs = {
        "video_events": {"video_ids": videos["video_id"].combine_chunks(),
                         "positive_actions": list(config.positive_video_actions)},
        "comment_events": {"comment_ids": comments["comment_id"].combine_chunks(),
                           "comment_video_idx": comments["video_idx"].to_numpy(),
                           "positive_actions": list(config.positive_comment_actions)},
    }
    parts, counted = [], []
    for table, kwargs in row_kwargs.items():
        if not run.files[table]:
            continue
        fn_kwargs = {"table": table, "out": str(out), "partitions": num_partitions, "row_kwargs": kwargs}
        if run.local:
            events = pa.concat_tables([pq.read_table(f, filesystem=run.eventlog_fs, partitioning=None)
                                       for f in run.files[table]], promote_options="permissive")
            counted += _rows([partitions.events_to_partitions(events, **fn_kwargs)])
            continue
        # A few read tasks of many files each: a task per small date file costs more than it reads.
        read = ray.data.read_parquet(run.files[table], partitioning=None, filesystem=run.eventlog_fs,
                                     override_num_blocks=min(len(run.files[table]), num_partitions),
                                     ray_remote_args=run.remote_args)
        parts.append(read.map_batches(partitions.events_to_partitions, batch_format="pyarrow", batch_size=None,
                                      fn_kwargs=fn_kwargs, **run.remote_args))
    if parts:
        counted = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).take_all()
    by_status = partitions.merge_counts(counted, ["kind", "status"])
    return {k: v["count"] for k, v in by_status.items()}, max((v["ts_max"] for v in by_status.values()), default=None)


def _run_stages(run: _Run, videos: pa.Table, comments: pa.Table, num_partitions: int, cut: int,
                after: int | None) -> _Stages:
    """Stage A, then stage B, one task per partition (partitions.annotate_partitions, partitions.user_partitions)."""

    config, shuffle = run.config, run.out / partitions.SHUFFLE
    valid_ts, test_ts = config.split_valid_ts, config.split_test_ts
    used = None
    if (config.split == "global_time" and not test_ts) or after is not None:
        used = partitions.read_parts(shuffle / "video", ["video_idx", "ts", "positive"])
        used = used.filter(pc.and_(used["positive"], pc.less_equal(used["ts"], cut)))
    if config.split == "global_time" and not test_ts:
        valid_ts, test_ts = global_cuts(used["ts"].to_numpy(), config.split_valid_frac, config.split_test_frac)
    touched = None
    if after is not None:
        # Only videos with a positive event in the window need stage A (with their whole history).
        touched = pc.unique(used.filter(pc.greater(used["ts"], after))["video_idx"])
    publications = publication_rows(comments)
    publications = publications.filter(pc.less_equal(publications["ts"], cut))
    # Stage A, per video: hot comments and comment candidates as of each event -> partition files by user.
    _per_partition(run, num_partitions, partitions.annotate_partitions, {
        "out": str(run.out), "partitions": num_partitions, "cut": cut, "after": after, "touched": touched,
        "publications": publications, "num_negatives": config.num_negatives, "seed": config.seed,
        "incremental": config.incremental})
    _log("stage A (hot comments, comment candidates) done")
    # popularity_at_t and the automatic alive window need every used positive video event (also the
    # earlier ones in an incremental build).
    pos = partitions.read_parts(shuffle / "video", ["kind", "video_idx", "ts", "positive"])
    pos = pos.filter(pc.and_(pc.and_(pc.equal(pos["kind"], KIND_VIDEO_EVENT), pos["positive"]),
                             pc.less_equal(pos["ts"], cut)))
    pos_ts, pos_video = pos["ts"].to_numpy(), pos["video_idx"].to_numpy()
    window_ms = config.negative_window_ms  # 0: each event's own window
    windows = window_summary(videos["ts"].to_numpy(), pos_ts,
                             *alive_bounds(videos["ts"].to_numpy(), pos_ts, config.num_negatives, window_ms))
    _log(f"video candidates: protocol {config.video_protocol}, alive window "
         f"{f'{window_ms / 3_600_000:.2f} h' if window_ms else 'per event'}: {windows}")
    # Stage B, per user: histories, examples, splits, users as of the cut; then video negatives and the
    # written files (partitions.write_parts).
    written = _per_partition(run, num_partitions, partitions.user_partitions, {
        "out": str(run.out), "after": after,
        "user_kwargs": {"max_history": config.max_history, "split": config.split, "valid_ts": valid_ts,
                        "test_ts": test_ts, "emit_after_ts": after},
        "write_kwargs": {"out": str(run.out), "video_ts": videos["ts"].to_numpy(),
                         "num_negatives": config.num_negatives, "seed": config.seed,
                         "window_ms": window_ms, "protocol": config.video_protocol,
                         "interaction_ts": pos_ts, "interaction_video": pos_video}})
    return _Stages(window_ms, valid_ts, test_ts, partitions.merge_counts(written, ["row_kind", "split"]),
                   windows)


def _add_earlier_counts(stats: dict[tuple, dict], old_manifest: dict) -> None:
    """An incremental build's counts += the earlier builds' (from their manifest): the window's rows came on
    top of theirs."""
    for task, split in [(t, s) for t in TASKS for s in SPLITS] + list(NOT_EXAMPLES):
        prev = old_manifest["tasks"][task].get(split) if (task, split) not in NOT_EXAMPLES else {
            "count": old_manifest["dropped"][NOT_EXAMPLES[task, split]], "ts_min": None, "ts_max": None}
        if prev and prev["count"]:
            now = stats.setdefault((task, split), {"count": 0, "ts_min": prev["ts_min"], "ts_max": prev["ts_max"]})
            now["count"] += prev["count"]
            if prev["ts_min"] is not None:
                now["ts_min"] = min(v for v in (now["ts_min"], prev["ts_min"]) if v is not None)
                now["ts_max"] = max(v for v in (now["ts_max"], prev["ts_max"]) if v is not None)


def _manifest(run: _Run, started: float, cut: int | None, after: int | None, stages: _Stages, embedding: dict,
              status: dict[tuple, int], ts_max: int | None, catalog: dict) -> dict:
    """manifest.json (docs/DATA.md section 3). catalog: num_videos, num_comments, comments_unknown_video."""
    config, stats = run.config, stages.stats
    num_users = pq.ParquetFile(run.out / contract.USERS).metadata.num_rows
    _log(f"{contract.USERS}: {num_users} users")
    if config.split == "leave_last_out":
        split_policy = ("leave_last_out: one cut per user for both tasks, over examples with a non-empty history: "
                        "test from the earliest of the tasks' last example times (tasks with >= 2 examples), valid "
                        "from the earliest second-to-last (tasks with >= 3), the rest train")
    else:
        split_policy = f"global_time: ts < {stages.valid_ts} train, ts < {stages.test_ts} valid, else test"
    empty_range = {"count": 0, "ts_min": None, "ts_max": None}
    return {
        "schema_version": SCHEMA_VERSION,
        "eventlog": str(config.eventlog),
        "mode": "incremental" if after is not None else "full",
        "cut_ts": cut,
        "previous_cut_ts": after,
        "lateness_ms": config.lateness_ms,
        "num_videos": catalog["num_videos"],
        "num_comments": catalog["num_comments"],
        "num_users": num_users,
        "max_history": config.max_history,
        "num_negatives": config.num_negatives,
        "comments_per_record": contract.COMMENTS_PER_RECORD,
        "seed": config.seed,
        "negative_window_ms": config.negative_window_ms,
        "video_protocol": config.video_protocol,
        "video_protocols": list(contract.VIDEO_PROTOCOLS),
        # The alive pools: a fixed W (ms), or 0 for each event's own W_t; the W_t of the used positive video
        # events (min, median, p90, max).
        "alive_window_ms": stages.window_ms,
        "alive_window_rule": ("configured" if config.negative_window_ms else
                              f"per event: the smallest W_t holding {config.num_negatives + 1} videos published "
                              "before it (all of them when fewer exist)"),
        "alive_windows": stages.windows,
        "positive_video_actions": list(config.positive_video_actions),
        "positive_comment_actions": list(config.positive_comment_actions),
        "encoder": config.encoder,
        "embedding_dim": embedding["dim"],
        "embeddings": {"cache": embedding["cache"],
                       **{f"{k}_{n}": v for k, d in embedding["stats"].items() for n, v in d.items()}},
        "split": config.split,
        "split_valid_ts": stages.valid_ts if config.split == "global_time" else None,
        "split_test_ts": stages.test_ts if config.split == "global_time" else None,
        "split_policy": split_policy,
        "tasks": {task: {split: stats.get((task, split), empty_range) for split in SPLITS} for task in TASKS},
        "events": {
            "video_events": sum(v for (k, _), v in status.items() if k == KIND_VIDEO_EVENT),
            "comment_events": sum(v for (k, _), v in status.items() if k == KIND_COMMENT_EVENT),
            "video_events_used": status.get((KIND_VIDEO_EVENT, "ok"), 0),
            "comment_events_used": status.get((KIND_COMMENT_EVENT, "ok"), 0),
            "video_events_not_positive": status.get((KIND_VIDEO_EVENT, "not_used"), 0),
            "comment_events_not_used": status.get((KIND_COMMENT_EVENT, "not_used"), 0),
            "ts_max": ts_max,
        },
        "dropped": {
            "comments_unknown_video": catalog["comments_unknown_video"],
            "video_events_unknown_video": status.get((KIND_VIDEO_EVENT, "unknown_video"), 0),
            "comment_events_unknown_comment": status.get((KIND_COMMENT_EVENT, "unknown_comment"), 0),
            **{key: stats.get(task_split, {}).get("count", 0) for task_split, key in NOT_EXAMPLES.items()},
        },
        "config": asdict(config),
        "build_s": round(time.time() - started, 3),
        "stages_in_process": run.local,  # FeaturesConfig.local_max_events: a small build skips Ray Data
        "embed_s": round(embedding["seconds"], 3),
    }
