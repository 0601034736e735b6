"""The event log: one folder of Parquet parts per table, written atomically, each id stored at most once."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ingestion.schema import ARROW_SCHEMA, ID_FIELD, TABLES


class EventLog:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def parts(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob("part-*.parquet"))

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        parts = self.parts(table)
        if not parts:
            return ARROW_SCHEMA[table].empty_table() if columns is None else ARROW_SCHEMA[table].empty_table().select(columns)
        return pa.concat_tables([pq.read_table(p, columns=columns, schema=ARROW_SCHEMA[table]) for p in parts])

    def ids(self, table: str) -> set[str]:
        """Every identity already in the log, so a redelivered record is not stored twice."""
        return set(self.read(table, [ID_FIELD[table]]).column(0).to_pylist())

    def count(self, table: str) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts(table))

    def append(self, table: str, records: list[dict]) -> Path | None:
        """Write records as one new part: temporary file, fsync, then rename, so readers never see half a file."""
        if not records:
            return None
        folder = self.root / table
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(records, schema=ARROW_SCHEMA[table]), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        final = folder / name
        os.replace(tmp, final)
        return final

    def counts(self) -> dict[str, int]:
        return {table: self.count(table) for table in TABLES}

