"""Consume the four topics in a consumer group into the event log and the online sequence store.

Guarantees (tested against the real broker in tests/ingestion/test_failures.py):
- Offsets are committed only after the records they cover are durable: event-log parts renamed into place,
  dead letters acknowledged by the broker, dead-letter counters saved. A crash anywhere means redelivery,
  never loss.
- A redelivered record is recognised by its id inside its date partition (IdIndex) and not stored twice.
- A bad record goes to the dead-letter topic with its original bytes and a `reason` header, once per source
  offset: the per-partition DeadLetterLedger remembers up to which offset dead letters were sent and counted.
- Partitions being taken away (rebalance) are flushed to the log first (not committed: see on_revoked); partitions given to us start with a
  fresh id index, because the previous owner may have written since.
- Backpressure: the loop polls at most `max_poll_records` and, once `flush_records` are buffered, hands them
  to a writer thread (Parquet parts, fsync, rename) and polls on. One write is in flight at most: the next one
  waits for it, so memory stays bounded at two buffers however slow the sink is (the broker holds the rest).
- The sequence store is updated after every poll (freshness), by a child process (ingestion.store_writer) in
  the order of the polls; it keys rows by event_id, so redelivery is harmless, and its own offsets let a
  restart replay what it lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from ingestion.eventlog import EventLog, IdIndex
from ingestion.replay import MAX_MESSAGE_BYTES
from ingestion.schema import ARROW_SCHEMA, ID_FIELD, TABLES, parse_batch
from ingestion.store_writer import StoreWriter
from ingestion.topics import topic_names

STATE_DIR = "_state"
EVENT_TABLES = ("video_events", "comment_events")
# Fetch sizes: 16 MB a response at most (this bounds the fetcher's own buffer too), 4 MB a partition. kafka-python
# fetches a partition again only once its last response is drained, so 1 MB a partition (its default) left the
# loop waiting on the broker between responses: 4 MB took a backlog from 43k to 53-58k events/s (issue 19).
FETCH_SETTINGS = {"fetch_max_bytes": 16 * 1024 * 1024, "max_partition_fetch_bytes": 4 * 1024 * 1024}


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
    # Stop once this many records were consumed (0: no limit), then write them: a backlog of known size read
    # as a plain poll loop reads it, without the idle wait (benchmarks).
    max_records: int = 0
    # Each poll is one batch: parsed column by column, one sequence-store transaction. Larger polls make a
    # backlog cheaper per record (the store writes each touched index page once per transaction).
    max_poll_records: int = 10_000
    # The online sequence store (SQLite file); empty means EVENTLOG/_state/sequences.sqlite.
    sequence_store: str = ""
    max_history: int = 50
    # Static group membership: a consumer restarted with the same id gets its partitions back at once instead
    # of waiting for the session timeout of its dead predecessor. Empty: dynamic membership.
    instance_id: str = ""
    session_timeout_ms: int = 10_000
    # Out of the group (never joined, or revoked and not given partitions again) for this long: close the
    # consumer and start a new one. kafka-python has been seen to stay out for good under heavy load.
    rejoin_after_s: float = 60.0
    # Date partitions whose ids stay in memory (see IdIndex).
    max_id_partitions: int = 64

    def __post_init__(self):
        if not self.eventlog or not self.bootstrap:
            raise ValueError("IngestConfig: eventlog and bootstrap are required")
        if self.flush_records < 1 or self.flush_interval_s <= 0 or self.max_poll_records < 1:
            raise ValueError("flush_records, flush_interval_s and max_poll_records must be positive")
        if self.until_idle_s is not None and self.until_idle_s <= 0:
            raise ValueError("until_idle_s must be positive or None")
        if self.max_records < 0:
            raise ValueError("max_records must be >= 0")
        if self.max_history < 1 or self.max_id_partitions < 1:
            raise ValueError("max_history and max_id_partitions must be >= 1")
        if self.rejoin_after_s <= self.session_timeout_ms / 1000:
            raise ValueError("rejoin_after_s must be longer than the session timeout")
        if self.session_timeout_ms < 6_000:
            raise ValueError("session_timeout_ms must be >= 6000 (the broker's group.min.session.timeout.ms)")

    @property
    def state_dir(self) -> Path:
        return Path(self.eventlog) / STATE_DIR

    @property
    def store_path(self) -> Path:
        return Path(self.sequence_store) if self.sequence_store else self.state_dir / "sequences.sqlite"


# ------------------------------------------------------------------------------------------- pure parts


def should_flush(pending: int, seconds_since_flush: float, polled_any: bool, flush_records: int,
                 flush_interval_s: float) -> bool:
    """Write when the buffer is full (the backpressure bound) or the interval passed with something new."""
    if pending >= flush_records:
        return True
    return seconds_since_flush >= flush_interval_s and (pending > 0 or polled_any)


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return float(ordered[int(rank) - 1])


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DeadLetterLedger:
    """Per source partition: the offset below which dead letters were already sent, and the count per reason.

    Saved (one small JSON file per partition, written only by the partition's owner) before offsets are
    committed, so a redelivered bad record is neither sent nor counted twice.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.state: dict[tuple[str, int], dict] = {}
        self.dirty: set[tuple[str, int]] = set()

    def _file(self, topic: str, partition: int) -> Path:
        return self.folder / f"{topic}-{partition}.json"

    def load(self, topic: str, partition: int) -> None:
        path = self._file(topic, partition)
        state = json.loads(path.read_text()) if path.exists() else {"sent_upto": 0, "reasons": {}}
        self.state[(topic, partition)] = state

    def is_new(self, topic: str, partition: int, offset: int) -> bool:
        if (topic, partition) not in self.state:
            self.load(topic, partition)
        return offset >= self.state[(topic, partition)]["sent_upto"]

    def record(self, topic: str, partition: int, offset: int, reason: str) -> None:
        if (topic, partition) not in self.state:
            self.load(topic, partition)
        state = self.state[(topic, partition)]
        state["sent_upto"] = max(state["sent_upto"], offset + 1)
        state["reasons"][reason] = state["reasons"].get(reason, 0) + 1
        self.dirty.add((topic, partition))

    def save(self) -> None:
        for topic, partition in sorted(self.dirty):
            _write_json_atomic(self._file(topic, partition), self.state[(topic, partition)])
        self.dirty.clear()

    def forget(self, partitions) -> None:
        """Drop partitions we no longer own (their next owner reads the saved file)."""
        for tp in partitions:
            self.state.pop(tp, None)


def triage(table: str, values: list[bytes], index: IdIndex) -> tuple[pa.Table, pa.Table, list[tuple[int, str]]]:
    """One partition's polled values, as a batch: (the valid records; those of them new to the log; (position,
    reason) of each bad one), the records as Arrow tables. New: its id is neither in the log nor earlier in the
    session, which `index` remembers."""
    valid, bad = parse_batch(table, values)
    keep = index.keep_new(table, valid[ID_FIELD[table]], valid["ts"])
    rows = pa.Table.from_pydict(valid, schema=ARROW_SCHEMA[table])
    return rows, rows if all(keep) else rows.filter(keep), bad


def read_dead_letter_counts(eventlog: str | Path) -> dict[str, int]:
    """Dead letters per reason, summed over every source partition (what `lsvcr ingest status` shows)."""
    total: Counter = Counter()
    for path in sorted((Path(eventlog) / STATE_DIR / "dead_letters").glob("*.json")):
        total.update(json.loads(path.read_text())["reasons"])
    return dict(total)


_collector_users = [0, None]  # loops inside collector_for_streaming in this process; the threshold before them
_collector_lock = threading.Lock()


@contextlib.contextmanager
def collector_for_streaming(young_threshold: int = 50_000):
    """Python's cyclic garbage collector set for the poll loop, and restored after it. The loop allocates
    several short-lived container objects a record (kafka-python's records, our columns), so the default
    threshold of 700 ran a collection every few dozen records, each also walking the objects that survive;
    that was 0.3 s of a 2.6 s backlog of 200,000 events (issue 19). Objects alive at the start (modules,
    the consumer) are frozen out of the collections. Loops on several threads share one setting: the first
    makes it, the last restores it."""
    with _collector_lock:
        _collector_users[0] += 1
        if _collector_users[0] == 1:
            _collector_users[1] = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(young_threshold, *_collector_users[1][1:])
    try:
        yield
    finally:
        with _collector_lock:
            _collector_users[0] -= 1
            if _collector_users[0] == 0:
                gc.set_threshold(*_collector_users[1])
                gc.unfreeze()


# ------------------------------------------------------------------------------------------- the loop


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingestor: "Ingestor"):
        self.ingestor = ingestor

    def on_partitions_revoked(self, revoked):
        self.ingestor.on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.ingestor.on_assigned(assigned)


class Ingestor:
    def __init__(self, config: IngestConfig):
        self.config = config
        self.log = EventLog(config.eventlog)
        self.log.remove_stale_temporaries()
        # A day's ids are read from the log only once the write in flight is in it (finish_flush).
        self.index = IdIndex(self.log, config.max_id_partitions, before_load=self.finish_flush)
        self.ledger = DeadLetterLedger(config.state_dir / "dead_letters")
        self.store = StoreWriter(config.store_path, config.max_history)
        self.topics = topic_names(config.topic_prefix)
        self.table_of_topic = {self.topics[t]: t for t in TABLES}
        self.buffer: dict[str, list[pa.Table]] = {t: [] for t in TABLES}  # new rows, one table per batch
        self.stats: Counter = Counter()
        self.member = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self._window = (time.monotonic(), 0)  # (start, stored so far) for the throughput figure
        self._metrics = _ray_metrics()
        self._check_store: set = set()
        self.last_durable = time.monotonic()
        self._durable_consumed = 0
        self.consumer = self._new_consumer()
        self._dead_letters: KafkaProducer | None = None  # made for the first bad record (see dead_letters)
        # Event-log parts are written and fsynced on this thread while the loop polls on (pyarrow and fsync
        # release the GIL); `writing` is the one write in flight: (its future, the offsets it covers, consumed).
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsvcr-eventlog")
        self.writing: tuple[Future, dict, int] | None = None

    def _new_consumer(self) -> KafkaConsumer:
        """A consumer subscribed to the event and catalog topics; out of the group until its first assignment."""
        config = self.config
        self.out_of_group_since: float | None = time.monotonic()
        extra = {"group_instance_id": config.instance_id} if config.instance_id else {}
        consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap,
            group_id=config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.max_poll_records,
            **FETCH_SETTINGS,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=max(1000, config.session_timeout_ms // 5),
            client_id=f"lsvcr-ingest-{self.member}",
            **extra,
        )
        consumer.subscribe(list(self.table_of_topic), listener=_Rebalance(self))
        return consumer

    def rejoin_if_stuck(self, now: float) -> bool:
        """Replace the consumer when it has been out of the group for rejoin_after_s. Returns whether it did.
        Buffered records are written first; the new member starts at the group's last commit and the log
        drops what it already holds by event_id."""
        since = self.out_of_group_since
        if since is None or now - since < self.config.rejoin_after_s:
            return False
        print(f"[ingest] out of group {self.config.group!r} for {now - since:.0f}s: starting a new consumer",
              flush=True)
        self.flush(commit=False)
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as err:
            print(f"[ingest] closing the old consumer: {err}", flush=True)
        self.stats["rejoins"] += 1
        self.consumer = self._new_consumer()
        return True

    # -- rebalance ------------------------------------------------------------------------------------

    # The listener runs on kafka-python's network thread, which must not block on the broker: no commit here.
    # Writing the buffer is enough: the next owner starts at the last commit and finds these ids in the log.

    def on_revoked(self, revoked) -> None:
        self.out_of_group_since = time.monotonic()
        self.flush(commit=False)
        self.ledger.forget([(tp.topic, tp.partition) for tp in revoked])
        self.stats["rebalances"] += 1

    def on_assigned(self, assigned) -> None:
        self.out_of_group_since = None
        self.index.clear()  # the previous owner may have written since we loaded these ids
        for tp in assigned:
            self.ledger.load(tp.topic, tp.partition)
        self._check_store = set(assigned)
        self._write_stats()  # status shows the new assignment at once

    def replay_store_gaps(self) -> None:
        """Seek a newly assigned partition back to the sequence store's offset when the store is behind the
        group's commit (it lost its last transactions in a power loss, or its writer process was killed with a
        batch in hand); the log dedups the replay by id."""
        stored = self.store.sync()
        for tp in self._check_store:
            behind = stored.get((tp.topic, tp.partition))
            try:
                committed = self.consumer.committed(tp)
            except KafkaError:
                continue
            if behind is not None and committed is not None and behind < committed:
                self.consumer.seek(tp, behind)
                self.stats["store_replays"] += 1
        self._check_store = set()

    # -- records --------------------------------------------------------------------------------------

    def handle_batch(self, tp, records) -> tuple[pa.Table, int]:
        """Parse one partition's records as a batch: buffer new valid ones, dead-letter bad ones. Returns the
        valid ones (duplicates included: the sequence store dedups by itself) and the next offset."""
        table = self.table_of_topic[tp.topic]
        valid, new, bad = triage(table, [record.value or b"" for record in records], self.index)
        for i, reason in bad:
            record = records[i]
            if self.ledger.is_new(tp.topic, tp.partition, record.offset):
                self._dead_letter(record, reason)
            else:
                self.stats["dead_letters_redelivered"] += 1
        if new.num_rows:
            self.buffer[table].append(new)
        self.stats["duplicates"] += valid.num_rows - new.num_rows
        self.stats["consumed"] += len(records)
        return valid, records[-1].offset + 1

    @property
    def dead_letters(self) -> KafkaProducer:
        """The dead-letter producer, made on first use: an idle producer's IO thread still wakes every few
        milliseconds and takes the GIL from the poll loop."""
        if self._dead_letters is None:
            self._dead_letters = KafkaProducer(bootstrap_servers=self.config.bootstrap, acks="all",
                                               client_id="lsvcr-dlq", linger_ms=5,
                                               max_request_size=MAX_MESSAGE_BYTES + 64 * 1024)
        return self._dead_letters

    def _dead_letter(self, record, reason: str) -> None:
        headers = [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ]
        self.dead_letters.send(self.topics["dead_letter"], key=record.key, value=record.value, headers=headers)
        self.ledger.record(record.topic, record.partition, record.offset, reason)
        self.stats["dead_letters"] += 1
        if self._metrics:
            self._metrics["dead_letters"].inc(1, tags={"reason": reason.split(":")[0]})

    def apply_to_store(self, polled: dict) -> None:
        """Send this poll's valid events to the online sequences (the store writer samples their freshness)."""
        events = {t: [] for t in EVENT_TABLES}
        offsets = {}
        produced_ms = []
        for tp, (table, valid, next_offset, records) in polled.items():
            offsets[(tp.topic, tp.partition)] = next_offset
            if table in events:
                events[table].append(valid)
                produced_ms.extend(r.timestamp for r in records)
        self.store.apply({t: pa.concat_tables(v) for t, v in events.items() if v}, offsets, produced_ms)

    def pending(self) -> int:
        return sum(rows.num_rows for batches in self.buffer.values() for rows in batches)

    def flush(self, commit: bool = True) -> None:
        """Make everything consumed so far durable, then (commit) commit the offsets that cover it."""
        self.start_flush(commit)
        self.finish_flush(commit)

    def start_flush(self, commit: bool = True) -> None:
        """Hand the buffer to the writer thread with the offsets it covers, once the write in flight (if any)
        is durable and, with `commit`, committed: at most one write is in flight, so memory stays bounded at
        two buffers."""
        self.finish_flush(commit)
        tables = {table: pa.concat_tables(batches) for table, batches in self.buffer.items() if batches}
        self.buffer = {t: [] for t in TABLES}
        # What commit() without offsets would commit now: the position of every assigned partition, all of
        # whose records up to there are in `tables`, in the log already, or dead-lettered.
        offsets = self.consumer._subscription.all_consumed_offsets()
        self.writing = (self.writer.submit(self._write, tables), offsets, self.stats["consumed"])

    def _write(self, tables: dict[str, pa.Table]) -> dict[str, int]:
        """On the writer thread: one part per table and date, each fsynced and renamed into place."""
        for table, rows in tables.items():
            self.log.append(table, rows)
        return {table: rows.num_rows for table, rows in tables.items()}

    def finish_flush(self, commit: bool = True, wait: bool = True) -> bool:
        """Complete the write in flight: its parts durable, the dead letters acknowledged by the broker, the
        ledger saved, then (commit) its offsets committed. Without `wait`, returns False while it is still
        being written."""
        if self.writing is None:
            return True
        future, offsets, consumed = self.writing
        if not wait and not future.done():
            return False
        self.writing = None
        for table, rows in future.result().items():  # the writer's error, if any, is raised here
            self.stats[f"stored_{table}"] += rows
            self.stats["stored"] += rows
            if self._metrics:
                self._metrics["stored"].inc(rows, tags={"table": table})
        if self._dead_letters is not None:
            self._dead_letters.flush()
        self.ledger.save()
        if not commit:
            return True
        try:
            self.consumer.commit(offsets)
        except KafkaError as err:
            # The records are durable, so a failed commit only means they may be delivered again (and deduped).
            self.stats["commit_failures"] += 1
            print(f"[ingest] commit failed, will retry on the next flush: {err!r}", flush=True)
        self._write_stats()
        if consumed > self._durable_consumed:  # not a flush with nothing new (the idle stop's)
            self.last_durable = time.monotonic()
            self._durable_consumed = consumed
        return True

    def _write_stats(self) -> None:
        start, stored_then = self._window
        now = time.monotonic()
        rate = (self.stats["stored"] - stored_then) / max(now - start, 1e-9)
        self._window = (now, self.stats["stored"])
        try:
            assigned = sorted(f"{tp.topic}-{tp.partition}" for tp in self.consumer.assignment())
        except KafkaError:
            assigned = []
        _write_json_atomic(self.config.state_dir / "consumers" / f"{self.member}.json", {
            "member": self.member, "updated_at": time.time(), "events_per_s": round(rate, 1),
            "assigned": assigned, **{k: v for k, v in self.stats.items()},
        })
        if self._metrics:
            self._metrics["events_per_s"].set(rate)

    def caught_up(self) -> bool | None:
        try:
            assigned = self.consumer.assignment()
            if not assigned:
                return False
            ends = self.consumer.end_offsets(list(assigned))
            return all(self.consumer.position(tp) >= ends[tp] for tp in assigned)
        except KafkaError:
            return None  # broker away: we cannot tell

    def run(self) -> dict:
        with collector_for_streaming():
            return self._run()

    def _run(self) -> dict:
        cfg = self.config
        started = last_flush = last_record = last_report = time.monotonic()
        first_record = None
        try:
            while True:
                batches = self.consumer.poll(timeout_ms=200)
                if self.rejoin_if_stuck(time.monotonic()):
                    continue
                if self._check_store:
                    self.replay_store_gaps()
                now = time.monotonic()
                polled = {}
                for tp, records in batches.items():
                    if records:
                        valid, next_offset = self.handle_batch(tp, records)
                        polled[tp] = (self.table_of_topic[tp.topic], valid, next_offset, records)
                if polled:
                    self.apply_to_store(polled)
                    last_record = now
                    first_record = first_record or now
                self.stats["peak_pending"] = max(self.stats["peak_pending"], self.pending())
                self.finish_flush(wait=False)  # commit a finished write at once
                if should_flush(self.pending(), now - last_flush, bool(polled), cfg.flush_records, cfg.flush_interval_s):
                    self.start_flush()
                    last_flush = time.monotonic()
                if now - last_report >= 10:
                    print(f"[ingest] {self.stats['consumed']:,} consumed, {self.stats['stored']:,} stored, "
                          f"{self.stats['dead_letters']:,} dead letters, {self.stats['duplicates']:,} duplicates",
                          flush=True)
                    last_report = now
                if cfg.max_records and self.stats["consumed"] >= cfg.max_records:
                    break
                if cfg.until_idle_s is not None and now - last_record >= cfg.until_idle_s:
                    caught_up = self.caught_up()
                    if caught_up is None:  # an outage is not idleness: producers resend once the broker is back
                        last_record = now
                    elif caught_up:
                        break
            self.flush()
            self.store.close()  # every event applied, the freshness samples back
        finally:
            self.consumer.close(autocommit=False)  # its revocation writes what is still buffered
            self.writer.shutdown(wait=True)
            if self._dead_letters is not None:
                self._dead_letters.close()
            self.store.stop()  # after an error: the child still applies what it was sent
        elapsed = time.monotonic() - started
        # From the first record polled to the last one durable: the rate figure, without start-up and idle tail.
        active = (self.last_durable - first_record) if first_record else 0.0
        # The same span on the wall clock, so that consumers in several processes can be timed together.
        active_until = time.time() - (time.monotonic() - self.last_durable)
        result = {**self.stats, "active_s": round(active, 3), "active_from_unix": round(active_until - active, 3),
                  "active_until_unix": round(active_until, 3),
                  "dead_letter_reasons": read_dead_letter_counts(cfg.eventlog),
                  "seconds": round(elapsed, 2),
                  "freshness_p50_ms": percentile(self.store.freshness_ms, 50),
                  "freshness_p99_ms": percentile(self.store.freshness_ms, 99)}
        print(f"[ingest] done: {result}", flush=True)
        return result


def _ray_metrics() -> dict | None:
    """Prometheus metrics through Ray when the consumer runs inside a Ray worker or driver; None otherwise."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray.util import metrics

    return {
        "stored": metrics.Counter("lsvcr_ingest_stored_events", "events written to the event log", tag_keys=("table",)),
        "dead_letters": metrics.Counter("lsvcr_ingest_dead_letters", "records sent to the dead-letter topic",
                                        tag_keys=("reason",)),
        "events_per_s": metrics.Gauge("lsvcr_ingest_events_per_s", "events stored per second over the last flush"),
    }


def ingest(config: IngestConfig) -> dict:
    Path(config.eventlog).mkdir(parents=True, exist_ok=True)
    return Ingestor(config).run()


def main(argv: list[str]) -> None:
    """`python -m ingestion.consumer '<IngestConfig as JSON>' [result.json]`: one consumer process (tests, scripts)."""
    cfg = IngestConfig(**json.loads(argv[0]))
    result = ingest(cfg)
    if len(argv) > 1:
        _write_json_atomic(Path(argv[1]), result)


if __name__ == "__main__":
    main(sys.argv[1:])
