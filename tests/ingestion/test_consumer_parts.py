"""The consumer's pure parts, without a broker."""

import pytest

from ingestion.consumer import DeadLetterLedger, IngestConfig, percentile, read_dead_letter_counts, should_flush


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
