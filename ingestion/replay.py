"""Replay a dataset folder to Kafka in time order: the four JSON Lines files, merged by ts.

Lines are sent as they are, bad ones included, so the consumer sees exactly what a live producer would send
and dead-letters what it must.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterator
from pathlib import Path

from kafka import KafkaProducer
from kafka.errors import MessageSizeTooLargeError

from ingestion.schema import KEY_FIELD, TABLES
from ingestion.topics import topic_names

FILE_OF = {table: f"{table}.jsonl" for table in TABLES}
# Kafka's default message.max.bytes; larger lines cannot travel and go straight to the dead-letter topic.
MAX_MESSAGE_BYTES = 1_000_000


def _peek(raw: bytes, key_field: str) -> tuple[int | None, bytes | None]:
    """(ts, key) of a raw line when they can be read; a bad line keeps its place with ts None."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    ts = obj.get("ts")
    key = obj.get(key_field)
    ts = ts if isinstance(ts, int) and not isinstance(ts, bool) else None
    key = str(key).encode() if isinstance(key, (str, int)) and not isinstance(key, bool) else None
    return ts, key


def _records(path: Path, table: str) -> Iterator[tuple[int, int, str, bytes | None, bytes]]:
    """(ts, line number, table, key, raw) in the file's order; a line without a ts inherits the one before."""
    last_ts = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            ts, key = _peek(raw, KEY_FIELD[table])
            last_ts = ts if ts is not None else last_ts
            yield (last_ts, n, table, key, raw)


def _is_sorted(path: Path, table: str) -> bool:
    prev = -1
    for ts, *_ in _records(path, table):
        if ts < prev:
            return False
        prev = ts
    return True


def _time_ordered(path: Path, table: str) -> Iterator[tuple[int, int, str, bytes | None, bytes]]:
    """Stream a file that is in time order (ours are); sort one that is not, in memory."""
    if _is_sorted(path, table):
        yield from _records(path, table)
    else:
        print(f"[replay] {path.name} is not in time order: sorting it in memory", flush=True)
        yield from sorted(_records(path, table), key=lambda r: (r[0], r[1]))


def replay(data_dir: str | Path, bootstrap: str, topic_prefix: str = "", progress_every: int = 50_000) -> dict:
    """Produce every line of the dataset to its topic, all four files merged by ts. Returns counts per table."""
    data_dir = Path(data_dir)
    missing = [FILE_OF[t] for t in TABLES if not (data_dir / FILE_OF[t]).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} is not a dataset folder: missing {', '.join(missing)}")
    topics = topic_names(topic_prefix)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        batch_size=256 * 1024,
        max_request_size=MAX_MESSAGE_BYTES + 4096,
        client_id="lsvcr-replay",
    )
    counts = {t: 0 for t in TABLES}
    too_large = 0
    started = time.monotonic()
    streams = [_time_ordered(data_dir / FILE_OF[t], t) for t in TABLES]
    try:
        for i, (ts, _, table, key, raw) in enumerate(heapq.merge(*streams, key=lambda r: r[0]), 1):
            if len(raw) > MAX_MESSAGE_BYTES:
                too_large += 1
                producer.send(
                    topics["dead_letter"],
                    key=key,
                    value=raw[:MAX_MESSAGE_BYTES // 2],
                    headers=[("reason", b"oversized_for_kafka"), ("source_topic", topics[table].encode())],
                )
                continue
            try:
                producer.send(topics[table], key=key, value=raw)
            except MessageSizeTooLargeError:
                too_large += 1
                continue
            counts[table] += 1
            if i % progress_every == 0:
                rate = i / max(time.monotonic() - started, 1e-9)
                print(f"[replay] {i:,} records sent ({rate:,.0f}/s)", flush=True)
        producer.flush()
    finally:
        producer.close()
    total = sum(counts.values())
    print(f"[replay] done: {total:,} records in {time.monotonic() - started:.1f}s {counts}", flush=True)
    return {**counts, "too_large": too_large}
