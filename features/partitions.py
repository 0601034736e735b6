"""The partition files between the stages of a build and the bodies of its tasks (build.py's docstring says
why partition files and not Ray Data's groupby). build.py maps these functions with Ray Data; they import no
Ray: they run the pure stage functions and read and write files of the local output folder OUT:

    events_to_partitions   a block of events -> OUT/_shuffle/video/p=<k>/ (video_idx mod P)
    annotate_partitions    stage A on each video of partition k -> OUT/_shuffle/user/p=<k>/ (user hash mod P)
    user_partitions        stage B on each user of partition k, then write_parts: video negatives ->
                           examples/<task>/<split>/ and OUT/_users_parts/
    finish_outputs         empty split files, user parts -> users.parquet

A part file's name is a hash of its rows' ids, so a retried task overwrites its own file instead of adding a
copy, and an extending (incremental) build writes an existing part under the same name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.contract import EXAMPLE_SCHEMA, SPLITS, TASKS, USERS, USERS_SCHEMA, examples_dir
from features.arrays import concat_or_empty, group_slices
from features.incremental import ANNOTATED
from features.interactions import INTERACTION_SCHEMA, comment_event_rows, video_event_rows
from features.negatives import add_video_negatives
from features.stage_a import ANNOTATED_SCHEMA, annotate_video_group, without_candidates
from features.stage_b import USER_ROWS_SCHEMA, select_rows, user_rows

SHUFFLE = "_shuffle"  # partition files between the stages of one build, removed at its end
USERS_PARTS = "_users_parts"  # user rows written by the stage B tasks, merged into users.parquet at the end
COUNTS_SCHEMA = pa.schema([("row_kind", pa.string()), ("split", pa.string()), ("ts_count", pa.int64()),
                           ("ts_min", pa.int64()), ("ts_max", pa.int64())])


def count_by(batch: pa.Table, keys: list[str]) -> pa.Table:
    """Rows and ts range per distinct keys: partial results that the caller merges (no shuffle needed).

    Single-threaded: Arrow's threaded group-by failed inside Ray Data tasks ("thread index 10 is out of range
    [0, 10)", pyarrow 26, seen under load), and these batches are small."""
    return batch.group_by(keys, use_threads=False).aggregate([("ts", "count"), ("ts", "min"), ("ts", "max")])


def merge_counts(parts: list[dict], keys: list[str]) -> dict[tuple, dict]:
    """Merge count_by rows (as dicts) from many batches: {key tuple: {"count", "ts_min", "ts_max"}}."""
    out: dict[tuple, dict] = {}
    for row in parts:
        key = tuple(row[k].item() if isinstance(row[k], np.generic) else row[k] for k in keys)
        seen = out.setdefault(key, {"count": 0, "ts_min": row["ts_min"], "ts_max": row["ts_max"]})
        seen["count"] += int(row["ts_count"])
        seen["ts_min"] = int(min(seen["ts_min"], row["ts_min"]))
        seen["ts_max"] = int(max(seen["ts_max"], row["ts_max"]))
    return out


def write_part(table: pa.Table, folder: Path, ids: pa.ChunkedArray) -> None:
    """folder/part-<hash of ids>.parquet, written under a temporary name and renamed into place."""
    digest = hashlib.blake2b("\x1f".join(ids.to_pylist()).encode(), digest_size=10).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".part-{digest}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / f"part-{digest}.parquet")


def read_parts(folder: Path, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Every part file under folder (recursively), concatenated; empty when there is none."""
    files = sorted(p for p in folder.rglob("part-*.parquet")) if folder.is_dir() else []
    tables = [pq.read_table(f, columns=columns) for f in files]
    if schema is not None:
        return concat_or_empty([t.cast(schema) for t in tables], schema)
    return pa.concat_tables(tables)


def partition_of(keys: pa.ChunkedArray, partitions: int) -> np.ndarray:
    """Partition number of each key, the same in every process: ints modulo P, strings by pandas' fixed-key hash."""
    if pa.types.is_integer(keys.type):
        return np.asarray(keys.to_numpy(), np.int64) % partitions
    import pandas as pd

    values = np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object)
    return (pd.util.hash_array(values) % np.uint64(partitions)).astype(np.int64)


def _write_partitions(table: pa.Table, folder: Path, key: str, partitions: int) -> None:
    """Split `table` by partition of `key` into folder/p=<k>/part-<hash of event ids>.parquet."""
    part = partition_of(table[key], partitions)
    for k in np.unique(part).tolist():
        rows = table.filter(pa.array(part == k))
        write_part(rows, folder / f"p={k}", rows["event_id"])


def events_to_partitions(batch: pa.Table, table: str, out: str, partitions: int, row_kwargs: dict) -> pa.Table:
    """One block of events -> interaction rows; the usable ones go to OUT/_shuffle/video/p=<k>/ by video;
    returns count_by(kind, status) for the manifest and the watermark."""
    to_rows = video_event_rows if table == "video_events" else comment_event_rows
    rows = to_rows(batch, **row_kwargs)
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    if len(ok):
        _write_partitions(ok, Path(out) / SHUFFLE / "video", "video_idx", partitions)
    return count_by(rows.select(["kind", "status", "ts"]), ["kind", "status"])


def _groups_apply(table: pa.Table, key: str, fn, schema: pa.Schema, **kwargs) -> pa.Table:
    return concat_or_empty([fn(group, **kwargs) for group in group_slices(table, key)], schema)


def annotate_partitions(batch: pa.Table, out: str, partitions: int, cut: int, after: int | None,
                        touched: pa.Array | None, publications: pa.Table, num_negatives: int, seed: int,
                        incremental: bool) -> pa.Table:
    """Stage A (annotate_video_group) on every video of the partitions in batch["part"], with their comment
    publications; the annotated rows after `after` go to OUT/_shuffle/user/p=<k>/ by user (and, incremental,
    to the state's history rows). `touched`: only these videos (an incremental build)."""
    root = Path(out)
    done = 0
    for k in batch["part"].to_pylist():
        events = read_parts(root / SHUFFLE / "video" / f"p={k}", schema=INTERACTION_SCHEMA)
        events = events.filter(pc.less_equal(events["ts"], cut))
        pubs = publications.filter(pa.array(partition_of(publications["video_idx"], partitions) == k))
        interactions = pa.concat_tables([events, pubs.cast(INTERACTION_SCHEMA)])
        if touched is not None:
            interactions = interactions.filter(pc.is_in(interactions["video_idx"], value_set=touched))
        annotated = _groups_apply(interactions, "video_idx", annotate_video_group, ANNOTATED_SCHEMA,
                                  num_negatives=num_negatives, seed=seed)
        if after is not None:
            annotated = annotated.filter(pc.greater(annotated["ts"], after))
        if len(annotated):
            if incremental:
                # History rows for the next incremental build (its stage B needs every earlier event of a user).
                write_part(without_candidates(annotated), root / ANNOTATED, annotated["event_id"])
            _write_partitions(annotated, root / SHUFFLE / "user", "user_id", partitions)
        done += len(annotated)
    return pa.table({"rows": [done]})


def user_partitions(batch: pa.Table, out: str, after: int | None, user_kwargs: dict, write_kwargs: dict) -> pa.Table:
    """Stage B (user_rows) on every user of the partitions in batch["part"], with the earlier builds' history
    rows of those users (incremental), then write_parts; returns its counts."""
    root = Path(out)
    counts = []
    for k in batch["part"].to_pylist():
        history = read_parts(root / SHUFFLE / "user" / f"p={k}", schema=ANNOTATED_SCHEMA)
        if after is not None and len(history):
            old = read_parts(root / ANNOTATED, schema=ANNOTATED_SCHEMA)
            users = pc.unique(history["user_id"])
            keep = pc.and_(pc.less_equal(old["ts"], after), pc.is_in(old["user_id"], value_set=users))
            history = pa.concat_tables([history, old.filter(keep)])
        rows = _groups_apply(history, "user_id", user_rows, USER_ROWS_SCHEMA, **user_kwargs)
        if len(rows):
            counts.append(write_parts(rows, **write_kwargs))
    return concat_or_empty(counts, COUNTS_SCHEMA)


def write_parts(batch: pa.Table, out: str, video_ts: np.ndarray, num_negatives: int, seed: int,
                window_ms: int, protocol: str = "alive_window", interaction_ts: np.ndarray | None = None,
                interaction_video: np.ndarray | None = None) -> pa.Table:
    """Stage B's output -> files: add video negatives (every protocol; `negatives` is `protocol`'s;
    interaction_ts / interaction_video are the used positive video events, for popularity_at_t), write each
    (task, split) slice of the batch and its user rows as part files, and return the batch's row counts
    (count_by) for the manifest.

    One pass writes every split (a scan per split costs seconds of scheduling each).
    """
    root = Path(out)
    video_rows = batch.filter(pc.equal(batch["row_kind"], "video"))
    with_negatives = {"video": add_video_negatives(video_rows, video_ts, num_negatives, seed, window_ms,
                                                   protocol, interaction_ts, interaction_video)}
    for task in TASKS:
        rows = with_negatives.get(task, batch)
        for split in SPLITS:
            part = select_rows(rows, task, split)
            if len(part):
                write_part(part, examples_dir(root, task, split), part["event_id"])
    users = select_rows(batch, "user")
    if len(users):
        write_part(users, root / USERS_PARTS, users["user_id"])
    return count_by(batch.select(["row_kind", "split", "ts"]), ["row_kind", "split"])


def finish_outputs(out: Path, keep_old_users: bool = False) -> None:
    """Every split folder gets a file (an empty one keeps the schema); user parts become users.parquet (with
    keep_old_users, the old users.parquet's rows of users that got no new row are kept)."""
    for task in TASKS:
        for split in SPLITS:
            folder = examples_dir(out, task, split)
            folder.mkdir(parents=True, exist_ok=True)
            if not any(folder.glob("*.parquet")):
                pq.write_table(EXAMPLE_SCHEMA[task].empty_table(), folder / "empty.parquet")
    parts = sorted((out / USERS_PARTS).glob("*.parquet")) if (out / USERS_PARTS).is_dir() else []
    new = [pq.read_table(part).cast(USERS_SCHEMA) for part in parts]
    old = pq.read_table(out / USERS) if keep_old_users and (out / USERS).exists() else None
    if old is not None and new:
        updated = pa.concat_tables([t.select(["user_id"]) for t in new])["user_id"]
        old = old.filter(pc.invert(pc.is_in(old["user_id"], value_set=updated.combine_chunks())))
    tmp = out / f".{USERS}.tmp"
    with pq.ParquetWriter(str(tmp), USERS_SCHEMA) as writer:
        if old is not None:
            writer.write_table(old.cast(USERS_SCHEMA))
        for table in new:
            writer.write_table(table)
    os.replace(tmp, out / USERS)
    if (out / USERS_PARTS).exists():
        shutil.rmtree(out / USERS_PARTS)
