"""The consumer's pure parts, without a broker."""

import json

import pyarrow as pa
import pytest

from ingestion.consumer import DeadLetterLedger, IngestConfig, percentile, read_dead_letter_counts, should_flush, triage
from ingestion.eventlog import EventLog, IdIndex, date_of
from ingestion.schema import ARROW_SCHEMA, ID_FIELD, InvalidRecord, parse

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
