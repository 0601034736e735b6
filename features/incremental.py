"""The state an incremental build (incremental=true) leaves for the next one, and whether the next may extend
it (build.py's docstring gives the rules):

    OUT/_state/state.json   identity (schema version, the config fields that change rows), cut_ts, the
                            event-log files read, each catalog's count and id digest
    OUT/_state/annotated/   stage A's rows at or before the cut, for the histories (partitions.py writes them)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.contract import MANIFEST

STATE = "_state"
ANNOTATED = f"{STATE}/annotated"
STATE_JSON = f"{STATE}/state.json"
EVENT_TABLES = ("video_events", "comment_events")


def _digest(ids: list[str]) -> str:
    return hashlib.blake2b("\x1f".join(ids).encode(), digest_size=16).hexdigest()


def load_state(out: Path, identity: dict, files: dict[str, list[str]], videos: pa.Table, comments: pa.Table,
               eventlog_fs) -> tuple[dict | None, str]:
    """The previous build's state when this build may extend it, else (None, why not). `identity`: what the
    state must match (save_state's); `files`: the event-log files per table, read through eventlog_fs."""
    path = out / STATE_JSON
    if not path.exists() or not (out / MANIFEST).exists():
        return None, "no earlier incremental build"
    state = json.loads(path.read_text())
    if any(state.get(key) != value for key, value in identity.items()):
        return None, "the earlier build used another config"
    for table, catalog, id_key in (("videos", videos, "video_id"), ("comments", comments, "comment_id")):
        n_old = state["catalog"][table]["count"]
        ids = catalog[id_key].to_pylist()
        if len(ids) < n_old or _digest(ids[:n_old]) != state["catalog"][table]["digest"]:
            return None, f"the {table} catalog order changed"
        if len(ids) > n_old and pc.min(catalog["ts"].slice(n_old)).as_py() <= state["cut_ts"]:
            return None, f"new {table} at or before the old cut {state['cut_ts']}"
    seen = set(state["files"])
    for table in EVENT_TABLES:
        for f in files[table]:
            if f not in seen and pc.min(pq.read_table(f, columns=["ts"], filesystem=eventlog_fs)["ts"]).as_py() \
                    <= state["cut_ts"]:
                return None, f"{f} holds events at or before the old cut {state['cut_ts']} (beyond the lateness bound)"
    return state, ""


def save_state(out: Path, identity: dict, cut_ts: int, files: dict[str, list[str]], videos: pa.Table,
               comments: pa.Table) -> None:
    (out / STATE).mkdir(exist_ok=True)
    state = {**identity, "cut_ts": cut_ts, "files": [f for table in EVENT_TABLES for f in files[table]],
             "catalog": {"videos": {"count": len(videos), "digest": _digest(videos["video_id"].to_pylist())},
                         "comments": {"count": len(comments), "digest": _digest(comments["comment_id"].to_pylist())}}}
    storage.write_text(str(out / STATE_JSON), json.dumps(state, indent=2) + "\n")
