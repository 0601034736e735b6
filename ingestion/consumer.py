"""Consume the four topics in a consumer group into the event log.

Offsets are committed only after the records they cover are durable (event log parts renamed into place and
dead letters acknowledged by the broker). A record redelivered after a crash is recognised by its id and
not stored twice.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from ingestion.eventlog import EventLog
from ingestion.schema import ID_FIELD, TABLES, InvalidRecord, parse
from ingestion.topics import topic_names


@dataclasses.dataclass
class IngestConfig:
    eventlog: str
    bootstrap: str
    group: str = "lsvcr-ingest"
    topic_prefix: str = ""
    flush_records: int = 20_000
    flush_interval_s: float = 2.0
    # Stop once every assigned partition is caught up and nothing arrived for this long (None: run forever).
    until_idle_s: float | None = None
    max_poll_records: int = 2_000

    def __post_init__(self):
        if self.flush_records < 1 or self.flush_interval_s <= 0 or self.max_poll_records < 1:
            raise ValueError("flush_records, flush_interval_s and max_poll_records must be positive")
        if self.until_idle_s is not None and self.until_idle_s <= 0:
            raise ValueError("until_idle_s must be positive or None")


class Ingestor:
    def __init__(self, config: IngestConfig):
        self.config = config
        self.log = EventLog(config.eventlog)
        self.topics = topic_names(config.topic_prefix)
        self.table_of_topic = {self.topics[t]: t for t in TABLES}
        self.seen = {t: self.log.ids(t) for t in TABLES}
        self.buffer: dict[str, list[dict]] = {t: [] for t in TABLES}
        self.stats: Counter = Counter()
        self.dead_reasons: Counter = Counter()
        self.consumer = KafkaConsumer(
            *self.table_of_topic,
            bootstrap_servers=config.bootstrap,
            group_id=config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.max_poll_records,
            client_id="lsvcr-ingest",
        )
        self.dead_letters = KafkaProducer(bootstrap_servers=config.bootstrap, acks="all", client_id="lsvcr-dlq")

    def handle(self, record) -> None:
        table = self.table_of_topic[record.topic]
        try:
            clean = parse(table, record.value or b"")
        except InvalidRecord as err:
            self._dead_letter(record, err.reason)
            return
        identity = clean[ID_FIELD[table]]
        if identity in self.seen[table]:
            self.stats["duplicates"] += 1
            return
        self.seen[table].add(identity)
        self.buffer[table].append(clean)

    def _dead_letter(self, record, reason: str) -> None:
        headers = [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ]
        self.dead_letters.send(self.topics["dead_letter"], key=record.key, value=record.value, headers=headers)
        self.dead_reasons[reason.split(":")[0]] += 1
        self.stats["dead_letters"] += 1

    def pending(self) -> int:
        return sum(len(v) for v in self.buffer.values())

    def flush(self) -> None:
        """Make everything consumed so far durable, then commit the offsets that cover it."""
        for table, records in self.buffer.items():
            if records:
                self.log.append(table, records)
                self.stats[f"stored_{table}"] += len(records)
                self.buffer[table] = []
        self.dead_letters.flush()
        self.consumer.commit()

    def caught_up(self) -> bool:
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        ends = self.consumer.end_offsets(list(assigned))
        return all(self.consumer.position(tp) >= ends[tp] for tp in assigned)

    def run(self) -> dict:
        cfg = self.config
        started = last_flush = last_record = time.monotonic()
        last_report = started
        try:
            while True:
                batches = self.consumer.poll(timeout_ms=500)
                now = time.monotonic()
                for records in batches.values():
                    for record in records:
                        self.handle(record)
                        self.stats["consumed"] += 1
                    last_record = now
                if self.pending() >= cfg.flush_records or (now - last_flush >= cfg.flush_interval_s and (self.pending() or batches)):
                    self.flush()
                    last_flush = now
                if now - last_report >= 10:
                    print(f"[ingest] {self.stats['consumed']:,} consumed, {self.stats['dead_letters']:,} dead letters, "
                          f"{self.stats['duplicates']:,} duplicates", flush=True)
                    last_report = now
                if cfg.until_idle_s is not None and now - last_record >= cfg.until_idle_s and self.caught_up():
                    break
            self.flush()
        finally:
            self.consumer.close(autocommit=False)
            self.dead_letters.close()
        elapsed = time.monotonic() - started
        result = {**self.stats, "dead_letter_reasons": dict(self.dead_reasons), "seconds": round(elapsed, 2)}
        print(f"[ingest] done: {result}", flush=True)
        return result


def ingest(config: IngestConfig) -> dict:
    Path(config.eventlog).mkdir(parents=True, exist_ok=True)
    return Ingestor(config).run()
