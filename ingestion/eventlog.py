"""The event log: Parquet parts per table and event date, written atomically, each id stored at most once.

Layout (docs/DATA.md section 2): `ROOT/<table>/date=YYYY-MM-DD/part-<ns>-<rand>.parquet`, the date being the
UTC day of the record's `ts`, so a late event lands in its own day's folder whenever it arrives. Writers keep
temporary files hidden (leading dot); readers only ever see whole parts. `ROOT/_state/` holds the consumer's
bookkeeping (dead-letter counters, consumer stats, the online sequence store) and is not part of any table.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingestion.schema import ARROW_SCHEMA, ID_FIELD, TABLES

DAY_MS = 86_400_000


def date_of(ts_ms: int) -> str:
    """The UTC day of an epoch-millisecond time: the event-log partition it belongs to."""
    return dt.datetime.fromtimestamp(ts_ms // 1000, dt.timezone.utc).strftime("%Y-%m-%d")


def group_by_date(rows: pa.Table) -> dict[str, pa.Table]:
    """Split rows into their date partitions, keeping their order inside each (one integer division per row,
    one date string per day)."""
    days = pc.divide(rows["ts"], DAY_MS)  # integer division: ts is validated positive
    return {date_of(day * DAY_MS): rows.filter(pc.equal(days, day)) for day in pc.unique(days).to_pylist()}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventLog:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def partition_dir(self, table: str, date: str) -> Path:
        return self.root / table / f"date={date}"

    def dates(self, table: str) -> list[str]:
        folder = self.root / table
        if not folder.is_dir():
            return []
        return sorted(p.name[5:] for p in folder.glob("date=*") if p.is_dir())

    def parts(self, table: str, date: str | None = None) -> list[Path]:
        if date is not None:
            return sorted(self.partition_dir(table, date).glob("part-*.parquet"))
        return sorted((self.root / table).glob("date=*/part-*.parquet"))

    def read(self, table: str, columns: list[str] | None = None, date: str | None = None) -> pa.Table:
        schema = ARROW_SCHEMA[table]
        parts = self.parts(table, date)
        if not parts:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        # Read each file on its own: a dataset read of the folder would add the hive `date` column.
        return pa.concat_tables([pq.read_table(p, columns=columns, schema=schema) for p in parts])

    def ids(self, table: str, date: str | None = None) -> set[str]:
        """Identities already in the log (one date partition, or all), so a redelivered record is not stored twice."""
        return set(self.read(table, [ID_FIELD[table]], date).column(0).to_pylist())

    def count(self, table: str) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts(table))

    def counts(self) -> dict[str, int]:
        return {table: self.count(table) for table in TABLES}

    def append(self, table: str, rows: pa.Table | list[dict]) -> list[Path]:
        """Write rows (clean records) as one new part per date partition: temporary file, fsync, rename.

        Each part is atomic on its own; a crash between two parts leaves the first one in place, and the
        redelivered records it holds are then recognised by id (see IdIndex).
        """
        if not isinstance(rows, pa.Table):
            rows = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA[table])
        written = []
        for date, group in group_by_date(rows).items():
            folder = self.partition_dir(table, date)
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = folder / f".{name}.tmp"
            pq.write_table(group, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
            _fsync_dir(folder)
            written.append(folder / name)
        return written

    def remove_stale_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files a killed writer left behind; recent ones may belong to a live writer."""
        removed = 0
        cutoff = time.time() - older_than_s
        for tmp in self.root.glob("*/date=*/.part-*.tmp"):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def compact(self, table: str, date: str, min_parts: int = 8) -> Path | None:
        """Merge a date partition's small parts into one (ids deduplicated); returns the new part or None.

        The merged part is renamed in before the old parts are removed, so a reader or a crash in between sees
        every row at least once and IdIndex still finds every id. Run it only on partitions no consumer is
        writing to (days that are over), because a part written meanwhile would be kept but not merged.
        """
        parts = self.parts(table, date)
        if len(parts) < min_parts:
            return None
        merged = pa.concat_tables([pq.read_table(p, schema=ARROW_SCHEMA[table]) for p in parts])
        ids = merged.column(ID_FIELD[table]).to_pylist()
        first = {}
        for i, identity in enumerate(ids):
            first.setdefault(identity, i)
        merged = merged.take(sorted(first.values()))
        folder = self.partition_dir(table, date)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{name}.tmp"
        pq.write_table(merged, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
        for p in parts:
            p.unlink()
        _fsync_dir(folder)
        return folder / name


class IdIndex:
    """Which ids the log already holds, loaded per (table, day) partition on first use.

    A redelivered record carries the same ts as the first delivery, so it can only collide inside its own date
    partition: the index never needs every id of the log, only those of the days being written. Restart cost is
    one id-column read per day touched, and at most `max_partitions` days stay in memory (least recently used
    are dropped and reloaded from the log if needed again).
    """

    def __init__(self, log: EventLog, max_partitions: int = 64, before_load: Callable[[], object] | None = None):
        if max_partitions < 1:
            raise ValueError("max_partitions must be >= 1")
        self.log = log
        # Called before a day's ids are read from the log: a writer with parts in flight makes them durable
        # first, or their ids would be missing from the reloaded day.
        self.before_load = before_load
        self.max_partitions = max_partitions
        self._sets: OrderedDict[tuple[str, int], set[str]] = OrderedDict()
        self.loads = 0

    def _ids(self, table: str, day: int) -> set[str]:
        key = (table, day)
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        if self.before_load is not None:
            self.before_load()
        ids = self.log.ids(table, date_of(day * DAY_MS))
        self.loads += 1
        self._sets[key] = ids
        return ids

    def keep_new(self, table: str, ids: list[str], ts: list[int]) -> list[bool]:
        """For each (id, ts) of a batch, in order: True (and remembered) if the id is new to its day, False for a
        duplicate. Days are evicted beyond max_partitions only after the batch, so none is dropped while in use."""
        days = np.asarray(ts, dtype=np.int64) // DAY_MS  # ts is validated: in [2000, 2100)
        unique, first = np.unique(days, return_index=True)
        known = {int(day): self._ids(table, int(day)) for day in unique[np.argsort(first)]}  # in batch order
        if len(known) == 1:
            by_day = {day: ids for day in known}
        else:  # each day's ids, in order, by array masks instead of a Python loop per id
            id_array = np.array(ids, dtype=object)
            by_day = {day: id_array[days == day].tolist() for day in known}
        if len(set(ids)) == len(ids) and all(known[day].isdisjoint(group) for day, group in by_day.items()):
            # The common case, in set operations: no id repeats in the batch or is known on its day.
            for day, group in by_day.items():
                known[day].update(group)
            keep = [True] * len(ids)
        else:
            keep = []
            for identity, day in zip(ids, days.tolist()):
                seen = known[day]
                keep.append(identity not in seen)
                seen.add(identity)
        while len(self._sets) > self.max_partitions:
            self._sets.popitem(last=False)
        return keep

    def clear(self) -> None:
        """Drop everything: another consumer may have written since (called when partitions are reassigned)."""
        self._sets.clear()
