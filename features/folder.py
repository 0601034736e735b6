"""A features folder (docs/DATA.md section 3), opened once and passed around by training, evaluation and
serving instead of a path string.

    folder = FeaturesFolder.open("FEATURES")           # a path, or a URI copied once per node into the cache
    folder.examples_table("video", "test", ["target"])
    video_emb, comment_emb = folder.text_tables()      # float32 memory maps [V, D], [C, D]
    video_ts, comment_ts = folder.item_times()         # publication times, ms, row = item index

A URI (s3://...) is read through a local copy taken once per node (`core.storage.local_copy`, keyed by the
URI and its manifest.json); Ray Data may still read the example files through the URI (`examples_source`), so
read tasks can run on any node. Pickling keeps only the two locations: in a Ray worker, `on_this_node()`
reuses the driver's copy when this machine has it, else takes the node's own.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core import contract, storage
from core.paths import cache_dir
from features.negatives import alive_bounds


def _copy_of(source: str) -> Path:
    return Path(os.path.abspath(storage.local_copy(source, cache_dir() / "features", contract.MANIFEST)))


class FeaturesFolder:
    def __init__(self, source: str | Path, root: str | Path | None = None):
        """source: the folder or URI as given; root: a local folder holding its files (default: the folder
        itself, or a copy of the URI in the cache)."""
        self.source = str(source) if not storage.is_local(source) else os.path.abspath(storage.local_path(source))
        self.root = Path(root) if root is not None else _copy_of(self.source)
        if not self.root.is_dir():
            raise FileNotFoundError(f"features folder {self.root} does not exist (lsvcr features build)")

    @classmethod
    def open(cls, features: str | Path | FeaturesFolder) -> FeaturesFolder:
        return features if isinstance(features, FeaturesFolder) else cls(features)

    def __repr__(self) -> str:
        return f"FeaturesFolder({self.source!r})" if self.source == str(self.root) else \
            f"FeaturesFolder({self.source!r}, root={str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __getstate__(self) -> dict:
        return {"source": self.source, "root": str(self.root)}  # not the memory maps

    def __setstate__(self, state: dict) -> None:
        self.source, self.root = state["source"], Path(state["root"])

    def on_this_node(self) -> FeaturesFolder:
        """In a Ray worker or actor: this folder when this node has its files (the same machine: a copy is
        renamed into place whole and named by the URI and its manifest, so one that is there is the one meant),
        else this node's own copy of the source."""
        if self.source == str(self.root) or (self.root / contract.MANIFEST).is_file():
            return self
        return FeaturesFolder(self.source)

    @property
    def is_remote(self) -> bool:
        return not storage.is_local(self.source)

    # ---- files -----------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """A top-level file (contract.VIDEOS, ...); FileNotFoundError when it is missing."""
        return _required(self.root / name)

    @property
    def manifest(self) -> dict:
        """manifest.json ({} when absent: hand-made folders in tests)."""
        file = self.root / contract.MANIFEST
        return json.loads(file.read_text()) if file.is_file() else {}

    def alive_bounds(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per event time: the videos alive then are the item indices lo..hi-1, under the build's rule
        (its fixed alive_window_ms, else each event's own window for its num_negatives; features/negatives.py)."""
        num_negatives, window_ms = _alive_rule(str(self.root))
        return alive_bounds(self.item_times()[0], ts, num_negatives, window_ms)

    # ---- examples --------------------------------------------------------------------------------------

    def examples_dir(self, task: str, split: str) -> Path:
        folder = contract.examples_dir(self.root, task, split)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing (features folder, docs/DATA.md section 3)")
        return folder

    def examples_source(self, task: str, split: str) -> tuple[str, object]:
        """(path, pyarrow file system or None) for Ray Data's read_parquet of a split: inside the URI's file
        system when the folder came from a URI (any node can read it), else the local folder."""
        folder = str(self.examples_dir(task, split))
        if not self.is_remote:
            return folder, None
        fs, path = storage.filesystem(storage.join(self.source, contract.EXAMPLES, task, split))
        return path, fs

    def count_examples(self, task: str, split: str) -> int:
        return pads.dataset(self.examples_dir(task, split), format="parquet").count_rows()

    def examples_table(self, task: str, split: str, columns: list[str] | None = None) -> pa.Table:
        return pads.dataset(self.examples_dir(task, split), format="parquet").to_table(columns=columns)

    def iter_examples(self, task: str, split: str, batch_size: int,
                      max_examples: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Example rows in file order as numpy batches (list columns become object arrays of arrays), like
        Ray Data's batch_format="numpy". max_examples > 0 stops after that many rows."""
        dataset = pads.dataset(self.examples_dir(task, split), format="parquet")
        seen = 0
        for record_batch in dataset.to_batches(batch_size=batch_size):
            if max_examples and seen >= max_examples:
                return
            if max_examples:
                record_batch = record_batch.slice(0, max_examples - seen)
            seen += record_batch.num_rows
            if record_batch.num_rows:
                yield {name: col.to_numpy(zero_copy_only=False)
                       for name, col in zip(record_batch.schema.names, record_batch.columns)}

    # ---- items and users -------------------------------------------------------------------------------

    def videos(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(contract.VIDEOS), columns=columns)

    def comments(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(contract.COMMENTS), columns=columns)

    def users(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(contract.USERS), columns=columns)

    def text_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(video_emb [V, D], comment_emb [C, D]) float32 read-only memory maps, opened once per process."""
        return _text_tables(str(self.root))

    def item_times(self) -> tuple[np.ndarray, np.ndarray]:
        """(video publication ts [V], comment publication ts [C]) int64 ms, row = item index: the reference
        points of item ages."""
        return _item_times(str(self.root))

    @property
    def num_videos(self) -> int:
        return self.text_tables()[0].shape[0]

    @property
    def num_comments(self) -> int:
        return self.text_tables()[1].shape[0]

    @property
    def text_dim(self) -> int:
        return self.text_tables()[0].shape[1]


def _required(file: Path) -> Path:
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing (features folder, docs/DATA.md section 3)")
    return file


@functools.lru_cache(maxsize=4)
def _text_tables(root: str) -> tuple[np.ndarray, np.ndarray]:
    tables = []
    for name in (contract.VIDEO_EMB, contract.COMMENT_EMB):
        file = _required(Path(root) / name)
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.ndim != 2 or array.dtype != np.float32:
            raise ValueError(f"{file}: expected float32 [N, D], got {array.dtype} {array.shape}")
        tables.append(array)
    if tables[0].shape[1] != tables[1].shape[1]:
        raise ValueError(f"{root}: video and comment embeddings differ in dimension "
                         f"({tables[0].shape[1]} vs {tables[1].shape[1]})")
    return tables[0], tables[1]


@functools.lru_cache(maxsize=4)
def _alive_rule(root: str) -> tuple[int, int]:
    """(num_negatives, fixed alive_window_ms or 0) from the manifest, read once per process like the item
    times it goes with: training asks for alive pools at every step."""
    manifest = FeaturesFolder(root).manifest
    return int(manifest.get("num_negatives", 99)), int(manifest.get("alive_window_ms") or 0)


@functools.lru_cache(maxsize=4)
def _item_times(root: str) -> tuple[np.ndarray, np.ndarray]:
    times = []
    for name in (contract.VIDEOS, contract.COMMENTS):
        file = _required(Path(root) / name)
        column = pq.read_table(file, columns=["ts"])["ts"]
        if column.null_count:
            raise ValueError(f"{file}: {column.null_count} rows have no publication time ts")
        times.append(column.to_numpy().astype(np.int64))
    return times[0], times[1]
