"""`lsvcr ingest status`: per-partition committed offsets and lag, throughput, dead letters, sequence store size.

Offsets and lag come from the broker (the group's committed offsets against the end offsets); throughput and
member assignments from the files each consumer writes at every flush (EVENTLOG/_state/consumers/*.json);
dead-letter counts from the per-partition ledgers the consumer saves before committing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from ingestion.consumer import STATE_DIR, read_dead_letter_counts
from ingestion.schema import TABLES
from ingestion.sequence_store import SequenceStore
from ingestion.topics import topic_names


def partition_lag(committed: dict[tuple[str, int], int | None], ends: dict[tuple[str, int], int]) -> list[dict]:
    """One row per partition; a partition the group never committed counts its whole length as lag."""
    rows = []
    for (topic, partition), end in sorted(ends.items()):
        done = committed.get((topic, partition))
        rows.append({"topic": topic, "partition": partition, "committed": done, "end": end,
                     "lag": end - (done or 0)})
    return rows


def _consumers(eventlog: Path, stale_after_s: float) -> list[dict]:
    now = time.time()
    members = []
    for path in sorted((eventlog / STATE_DIR / "consumers").glob("*.json")):
        info = json.loads(path.read_text())
        info["alive"] = now - info.get("updated_at", 0) <= stale_after_s
        members.append(info)
    return members


def ingest_status(eventlog: str | Path, bootstrap: str, group: str = "lsvcr-ingest", topic_prefix: str = "",
                  stale_after_s: float = 30.0) -> dict:
    eventlog = Path(eventlog)
    topics = [topic_names(topic_prefix)[t] for t in TABLES]
    # A consumer with the group's id that never subscribes: it reads the group's offsets without joining it.
    probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                          client_id="lsvcr-status")
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(probe.partitions_for_topic(t) or ())]
        ends = {(tp.topic, tp.partition): o for tp, o in probe.end_offsets(tps).items()} if tps else {}
        committed = {(tp.topic, tp.partition): probe.committed(tp) for tp in tps}
    finally:
        probe.close(autocommit=False)
    rows = partition_lag(committed, ends)
    members = _consumers(eventlog, stale_after_s)
    store_path = eventlog / STATE_DIR / "sequences.sqlite"
    store = None
    if store_path.exists():
        s = SequenceStore(store_path, readonly=True)
        store = s.counts()
        s.close()
    return {
        "group": group,
        "partitions": rows,
        "total_lag": sum(r["lag"] for r in rows),
        "events_per_s": round(sum(m.get("events_per_s", 0.0) for m in members if m["alive"]), 1),
        "consumers": members,
        "dead_letters": read_dead_letter_counts(eventlog),
        "sequence_store": store,
    }


def format_status(status: dict) -> str:
    lines = [f"group {status['group']}: total lag {status['total_lag']:,}, {status['events_per_s']:,.0f} events/s "
             f"({sum(m['alive'] for m in status['consumers'])} live consumers)",
             f"{'topic':<32} {'part':>4} {'committed':>12} {'end':>12} {'lag':>10}"]
    for r in status["partitions"]:
        committed = "-" if r["committed"] is None else f"{r['committed']:,}"
        lines.append(f"{r['topic']:<32} {r['partition']:>4} {committed:>12} {r['end']:>12,} {r['lag']:>10,}")
    dead = status["dead_letters"]
    lines.append("dead letters: " + (", ".join(f"{k}={v:,}" for k, v in sorted(dead.items())) if dead else "none"))
    if status["sequence_store"]:
        lines.append("sequence store: " + ", ".join(f"{k}={v:,}" for k, v in status["sequence_store"].items()))
    return "\n".join(lines)
