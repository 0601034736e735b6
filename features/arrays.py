"""Arrow and numpy helpers shared by the feature stages: seeded sampling that every process repeats exactly,
list columns from flat values, time order and per-key groups. Pure functions, no Ray.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def stable_seed(seed: int, salt: str, key: str) -> int:
    """A 64-bit seed from (seed, salt, key) that is the same in every process (Python's hash() is not)."""
    digest = hashlib.blake2b(f"{seed}\x1f{salt}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_excluding(rng: np.random.Generator, lo: int, hi: int, exclude: int, k: int) -> np.ndarray:
    """Up to k distinct ints from [lo, hi) other than `exclude`, sorted; all of them when fewer than k."""
    excluded = lo <= exclude < hi
    n = max(hi - lo - int(excluded), 0)
    picks = np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))
    values = lo + picks
    if excluded:
        # Close the gap left by `exclude`: positions at or after it move up by one.
        values = values + (values >= exclude)
    return values.astype(np.int32)


def gather_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values[starts[i]:ends[i]] for every i, as (offsets [n+1] int32, flat values): a list column's parts."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Element j of row i sits at flat position offsets[i] + j and comes from values[starts[i] + j].
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    return offsets.astype(np.int32), values[index]


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def list_column(rows: list, value_type: pa.DataType) -> pa.ListArray:
    return pa.array(rows, pa.list_(value_type))


def sort_by_time(table: pa.Table, tiebreak: str = "event_id") -> pa.Table:
    return table.take(pc.sort_indices(table, [("ts", "ascending"), (tiebreak, "ascending")]))


def require_columns(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """`table` with exactly the columns of `schema`, cast to it; ValueError naming the missing ones."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; expected {schema.names}")
    return table.select(schema.names).cast(schema)


def group_slices(table: pa.Table, key: str) -> list[pa.Table]:
    """The rows of each distinct `key`, one table per key, in key order."""
    if len(table) == 0:
        return []
    table = table.take(pc.sort_indices(table, [(key, "ascending")]))
    keys = table[key].to_numpy(zero_copy_only=False)
    bounds = [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist(), len(table)]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def concat_or_empty(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()
