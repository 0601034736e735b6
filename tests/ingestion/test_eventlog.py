from ingestion.eventlog import EventLog


def _event(i):
    return {"event_id": f"e{i}", "user_id": "u1", "video_id": "v1", "action": "like", "watch_ms": None, "ts": 1_700_000_000_000 + i}


def test_append_writes_parts_that_read_back(tmp_path):
    log = EventLog(tmp_path)
    log.append("video_events", [_event(1), _event(2)])
    log.append("video_events", [_event(3)])
    assert log.append("video_events", []) is None
    assert log.count("video_events") == 3
    assert log.ids("video_events") == {"e1", "e2", "e3"}
    assert log.read("video_events")["ts"].to_pylist() == [1_700_000_000_001, 1_700_000_000_002, 1_700_000_000_003]
    # no temporary file is left behind by a finished write
    assert not list((tmp_path / "video_events").glob(".*tmp"))


def test_empty_table_reads_as_empty_with_schema(tmp_path):
    table = EventLog(tmp_path).read("comments")
    assert table.num_rows == 0
    assert "comment_id" in table.column_names
