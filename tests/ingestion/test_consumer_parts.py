"""The consumer's pure parts, without a broker."""

import gc
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from ingestion.consumer import (
    DeadLetterLedger,
    IngestConfig,
    Ingestor,
    collector_for_streaming,
    percentile,
    read_dead_letter_counts,
    should_flush,
    triage,
)
from ingestion.eventlog import EventLog, IdIndex, date_of
from ingestion.schema import ARROW_SCHEMA, ID_FIELD, TABLES, InvalidRecord, parse

T0 = 1_700_000_000_000
DAY = 86_400_000


def test_should_flush_when_full_or_interval_passed_with_news():
    assert should_flush(100, 0.0, True, flush_records=100, flush_interval_s=2)  # full: backpressure bound
    assert not should_flush(99, 1.9, True, flush_records=100, flush_interval_s=2)
    assert should_flush(1, 2.0, False, flush_records=100, flush_interval_s=2)
    assert should_flush(0, 2.0, True, flush_records=100, flush_interval_s=2)  # only dead letters/duplicates: commit
    assert not should_flush(0, 5.0, False, flush_records=100, flush_interval_s=2)  # idle: nothing to do


def test_percentile_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7], 99) == 7.0
    assert percentile([], 50) is None


def test_ledger_sends_each_offset_once_across_restarts(tmp_path):
    folder = tmp_path / "_state" / "dead_letters"
    ledger = DeadLetterLedger(folder)
    assert ledger.is_new("events.video", 0, 5)
    ledger.record("events.video", 0, 5, "malformed_json")
    ledger.record("events.video", 0, 9, "unknown_action")
    ledger.record("events.video", 1, 0, "malformed_json")
    assert not ledger.is_new("events.video", 0, 9)
    ledger.save()
    again = DeadLetterLedger(folder)  # a restarted consumer
    assert not again.is_new("events.video", 0, 7)
    assert again.is_new("events.video", 0, 10)
    assert read_dead_letter_counts(tmp_path) == {"malformed_json": 2, "unknown_action": 1}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        IngestConfig(eventlog="x", bootstrap="b", flush_records=0)
    with pytest.raises(ValueError):
        IngestConfig(eventlog="x", bootstrap="b", session_timeout_ms=1000)
    with pytest.raises(ValueError, match="rejoin_after_s"):
        IngestConfig(eventlog="x", bootstrap="b", session_timeout_ms=10_000, rejoin_after_s=5)
    with pytest.raises(ValueError, match="max_records"):
        IngestConfig(eventlog="x", bootstrap="b", max_records=-1)
    assert IngestConfig(eventlog="/tmp/log", bootstrap="b").store_path.as_posix() == "/tmp/log/_state/sequences.sqlite"


def _record_by_record(table, values, known):
    """The reference: schema.parse on each record, then its (id, day) against everything seen before."""
    rows, bad = [], []
    for i, value in enumerate(values):
        try:
            clean = parse(table, value)
        except InvalidRecord as err:
            bad.append((i, err.reason))
            continue
        key = (clean[ID_FIELD[table]], date_of(clean["ts"]))
        if key not in known:
            known.add(key)
            rows.append(clean)
    return rows, bad


def _event(i, day=0, **changes):
    return json.dumps({"event_id": f"e{i}", "user_id": f"u{i % 3}", "video_id": f"v{i}", "action": "like",
                       "watch_ms": i, "ts": T0 + day * DAY + i, **changes}).encode()


def test_batched_path_stores_the_rows_and_dead_letters_of_the_record_by_record_path(tmp_path):
    on_disk = [_event(0), _event(1, day=1)]
    batches = [
        # all good and new, over two days: the column and set fast paths
        [_event(2), _event(3, day=1), _event(4, event_id=4, watch_ms=None), _event(5, extra="kept out")],
        # good, duplicate (in the log, earlier batch, same batch) and bad records mixed
        [_event(0), _event(6), b"{not json", _event(2), _event(6), _event(7, action="dance"), b"",
         _event(8, ts=1_700_000_000), _event(9, user_id="  "), _event(4, event_id=4), _event(1, day=2),
         _event(10, watch_ms=-1), _event(11, user_id=True), b"[1, 2]", _event(12, ts=float(T0)),
         json.dumps({"event_id": "e13", "user_id": "u1", "video_id": "v1", "action": "view"}).encode()],
        # a redelivery of the first batch: only duplicates
        [_event(2), _event(3, day=1), _event(5)],
    ]
    log, reference = EventLog(tmp_path / "batched"), EventLog(tmp_path / "reference")
    for target in (log, reference):
        target.append("video_events", [parse("video_events", v) for v in on_disk])
    index = IdIndex(log)
    known = {(parse("video_events", v)["event_id"], date_of(parse("video_events", v)["ts"])) for v in on_disk}
    for values in batches:
        valid, new, bad = triage("video_events", values, index)
        want_rows, want_bad = _record_by_record("video_events", values, known)
        assert bad == want_bad
        assert new.to_pylist() == want_rows
        assert new.schema == ARROW_SCHEMA["video_events"]
        # the valid records (new or not) go to the sequence store
        good = [parse("video_events", v) for i, v in enumerate(values) if i not in dict(bad)]
        assert valid.to_pylist() == good
        log.append("video_events", new)
        reference.append("video_events", pa.Table.from_pylist(want_rows, schema=ARROW_SCHEMA["video_events"]))
    assert [reason for _, reason in _record_by_record("video_events", batches[1], set())[1]] == [
        "malformed_json", "unknown_action", "malformed_json", "bad_timestamp", "empty_id", "negative:watch_ms",
        "wrong_type:user_id", "not_an_object", "wrong_type:ts", "missing_field:ts"]
    assert log.dates("video_events") == reference.dates("video_events") == ["2023-11-14", "2023-11-15", "2023-11-16"]
    key = lambda r: (r["ts"], r["event_id"])  # noqa: E731
    assert sorted(log.read("video_events").to_pylist(), key=key) == sorted(
        reference.read("video_events").to_pylist(), key=key)
    assert log.count("video_events") == 2 + 4 + 2  # on disk before, new in the first batch, in the second


class _FakeConsumer:
    """What the flush path asks of a KafkaConsumer: its consumed positions and commits."""

    def __init__(self):
        self.positions, self.commits = {"tp": 10}, []
        self._subscription = self

    def all_consumed_offsets(self):
        return dict(self.positions)

    def commit(self, offsets):
        self.commits.append(offsets)

    def assignment(self):
        return set()


class _BlockingLog(EventLog):
    """An event log whose appends wait until released (a slow disk)."""

    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()

    def append(self, table, rows):
        assert self.release.wait(10)
        return super().append(table, rows)


def _flushing_ingestor(tmp_path) -> Ingestor:
    """An Ingestor with the state its flush path uses, a fake consumer and no broker."""
    ingestor = Ingestor.__new__(Ingestor)
    ingestor.config = IngestConfig(eventlog=str(tmp_path / "log"), bootstrap="127.0.0.1:1")
    ingestor.log = _BlockingLog(tmp_path / "log")
    ingestor.ledger = DeadLetterLedger(tmp_path / "ledger")
    ingestor.consumer = _FakeConsumer()
    ingestor.buffer = {t: [] for t in TABLES}
    ingestor.stats, ingestor._metrics, ingestor._dead_letters = Counter(), None, None
    ingestor.writer, ingestor.writing = ThreadPoolExecutor(1), None
    ingestor.member, ingestor._window = "test", (time.monotonic(), 0)
    ingestor.last_durable, ingestor._durable_consumed = 0.0, 0
    return ingestor


def _rows(*events):
    return pa.Table.from_pylist([parse("video_events", e) for e in events], schema=ARROW_SCHEMA["video_events"])


def test_offsets_are_committed_only_once_the_write_that_covers_them_is_durable(tmp_path):
    ingestor = _flushing_ingestor(tmp_path)
    ingestor.buffer["video_events"].append(_rows(_event(0), _event(1)))
    ingestor.stats["consumed"] = 2
    ingestor.start_flush()
    ingestor.consumer.positions["tp"] = 25  # the loop polls on while the part is written
    assert ingestor.pending() == 0
    assert ingestor.finish_flush(wait=False) is False  # still on the disk
    assert ingestor.consumer.commits == [] and ingestor.stats["stored"] == 0
    ingestor.log.release.set()
    assert ingestor.finish_flush() is True
    assert ingestor.consumer.commits == [{"tp": 10}]  # the positions when the write started, not 25
    assert ingestor.stats["stored"] == ingestor.log.count("video_events") == 2
    assert ingestor._durable_consumed == 2
    assert ingestor.finish_flush() is True and len(ingestor.consumer.commits) == 1  # nothing left in flight


def test_a_second_flush_waits_for_the_first_and_a_revocation_commits_nothing(tmp_path):
    ingestor = _flushing_ingestor(tmp_path)
    ingestor.log.release.set()
    ingestor.buffer["video_events"].append(_rows(_event(0)))
    ingestor.start_flush()
    ingestor.buffer["video_events"].append(_rows(_event(1, day=1)))
    ingestor.consumer.positions["tp"] = 11
    ingestor.start_flush()  # the first write is made durable and committed first
    assert ingestor.consumer.commits == [{"tp": 10}]
    ingestor.flush(commit=False)  # what a revocation does: durable, not committed
    assert ingestor.consumer.commits == [{"tp": 10}]
    assert ingestor.stats["stored"] == ingestor.log.count("video_events") == 2


def test_a_failed_write_is_raised_in_the_loop_and_commits_nothing(tmp_path):
    ingestor = _flushing_ingestor(tmp_path)
    ingestor.log.append = lambda table, rows: (_ for _ in ()).throw(OSError("disk full"))
    ingestor.buffer["video_events"].append(_rows(_event(0)))
    ingestor.start_flush()
    with pytest.raises(OSError, match="disk full"):
        ingestor.finish_flush()
    assert ingestor.consumer.commits == []


def test_the_collector_is_restored_after_the_last_loop():
    before = gc.get_threshold()
    outer, inner = collector_for_streaming(12_345), collector_for_streaming(12_345)
    outer.__enter__()
    assert gc.get_threshold()[0] == 12_345 and gc.get_freeze_count() > 0
    inner.__enter__()  # a second loop on another thread
    outer.__exit__(None, None, None)  # the first one ends first
    assert gc.get_threshold()[0] == 12_345  # still in use
    inner.__exit__(None, None, None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_id_index_settles_the_writer_before_it_reads_a_day_from_the_log(tmp_path):
    calls = []
    log = EventLog(tmp_path)
    index = IdIndex(log, before_load=lambda: calls.append("settled"))
    index.keep_new("video_events", ["e1", "e2"], [T0, T0 + DAY])
    assert calls == ["settled", "settled"]  # one read per day
    index.keep_new("video_events", ["e3"], [T0])
    assert calls == ["settled", "settled"]  # that day is in memory
