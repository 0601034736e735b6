import pyarrow.parquet as pq

from ingestion.eventlog import EventLog, IdIndex, date_of

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
DAY = 86_400_000


def _event(i, ts=None):
    return {"event_id": f"e{i}", "user_id": "u1", "video_id": "v1", "action": "like", "watch_ms": None,
            "ts": T0 + i if ts is None else ts}


def test_date_of_is_the_utc_day():
    assert date_of(T0) == "2023-11-14"
    assert date_of(1_700_006_400_000) == "2023-11-15"  # exactly midnight UTC starts the next day
    assert date_of(1_700_006_399_999) == "2023-11-14"


def test_append_writes_parts_that_read_back(tmp_path):
    log = EventLog(tmp_path)
    log.append("video_events", [_event(1), _event(2)])
    log.append("video_events", [_event(3)])
    assert log.append("video_events", []) == []
    assert log.count("video_events") == 3
    assert log.ids("video_events") == {"e1", "e2", "e3"}
    assert sorted(log.read("video_events")["ts"].to_pylist()) == [T0 + 1, T0 + 2, T0 + 3]
    # no temporary file is left behind by a finished write
    assert not list(tmp_path.rglob(".*tmp"))


def test_records_land_in_their_event_date_partition_even_when_late(tmp_path):
    log = EventLog(tmp_path)
    # one batch that mixes today's events with a late one from two days before
    log.append("video_events", [_event(1), _event(2, ts=T0 - 2 * DAY), _event(3)])
    assert log.dates("video_events") == ["2023-11-12", "2023-11-14"]
    assert log.ids("video_events", "2023-11-12") == {"e2"}
    assert log.ids("video_events", "2023-11-14") == {"e1", "e3"}
    parts = log.parts("video_events")
    assert [p.parent.name for p in parts] == ["date=2023-11-12", "date=2023-11-14"]
    # each part holds exactly the contract columns (no partition column written into the file)
    assert pq.read_schema(parts[0]).names == ["event_id", "user_id", "video_id", "action", "watch_ms", "ts"]


def test_id_index_rejects_ids_already_in_the_log_and_in_this_session(tmp_path):
    log = EventLog(tmp_path)
    log.append("video_events", [_event(1)])
    index = IdIndex(log, max_partitions=1)
    # e1 is on disk already, the second e2 was seen in this batch
    assert index.keep_new("video_events", ["e1", "e2", "e2"], [T0 + 1, T0 + 2, T0 + 2]) == [False, True, False]
    # a batch over two days keeps both in memory while it runs, then evicts the least recently used
    assert index.keep_new("video_events", ["e2", "e9", "e3"], [T0 + 2, T0 + 3 * DAY, T0 + 3]) == [False, True, True]
    assert index.loads == 2
    # day 0 was evicted (max_partitions=1): coming back reloads it from the log, where e2 is not
    assert index.keep_new("video_events", ["e2"], [T0 + 2]) == [True]
    assert index.loads == 3
    # the same id on another day is another record (a redelivery keeps its ts, so its day)
    assert index.keep_new("video_events", ["e7", "e7"], [T0 + 7, T0 + 3 * DAY]) == [True, True]


def test_compact_merges_parts_and_drops_duplicate_ids(tmp_path):
    log = EventLog(tmp_path)
    for i in range(3):
        log.append("video_events", [_event(i)])
    log.append("video_events", [_event(0)])  # a duplicate written by a zombie consumer
    assert log.compact("video_events", "2023-11-14", min_parts=8) is None
    merged = log.compact("video_events", "2023-11-14", min_parts=2)
    assert log.parts("video_events") == [merged]
    assert sorted(log.read("video_events")["event_id"].to_pylist()) == ["e0", "e1", "e2"]


def test_empty_table_reads_as_empty_with_schema(tmp_path):
    table = EventLog(tmp_path).read("comments")
    assert table.num_rows == 0
    assert "comment_id" in table.column_names


def test_id_index_batch_over_several_days_remembers_each_id_on_its_own_day(tmp_path):
    index = IdIndex(EventLog(tmp_path))
    ids = [f"e{i}" for i in range(9)]
    ts = [T0 + (i % 3) * DAY + i for i in range(9)]  # three days, interleaved
    assert index.keep_new("video_events", ids, ts) == [True] * 9  # all new: the set-operation path
    assert index.loads == 3
    # again, plus new ids: only the new ones are kept, and an old id on another day is another record
    assert index.keep_new("video_events", ids[:4] + ["n1", "e0"], ts[:4] + [T0, T0 + DAY]) == \
        [False] * 4 + [True, True]
    assert index.keep_new("video_events", ["e0"], [T0 + DAY]) == [False]
    assert index.keep_new("video_events", [], []) == []
