"""Replay and ingest through the real broker: valid records land once, bad ones become dead letters."""

import json

import pytest

from ingestion.consumer import IngestConfig, ingest
from ingestion.eventlog import EventLog
from ingestion.replay import replay
from ingestion.topics import ensure_topics, topic_names
from tests.ingestion.conftest import read_topic

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def _write(folder, name, lines):
    (folder / name).write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def test_replay_then_ingest_stores_valid_records_once_and_dead_letters_the_rest(tmp_path, kafka_bootstrap):
    data = tmp_path / "data"
    data.mkdir()
    _write(data, "videos.jsonl", [{"video_id": "v1", "title": "Pasta", "tags": ["cooking"], "author_id": "a", "ts": T0}])
    _write(data, "comments.jsonl", [{"comment_id": "c1", "video_id": "v1", "author_id": "a", "text": "yum", "parent_id": None, "ts": T0 + 1}])
    good = {"event_id": "e1", "user_id": "u1", "video_id": "v1", "action": "like", "watch_ms": 10, "ts": T0 + 2}
    _write(data, "video_events.jsonl", [
        good,
        good,  # duplicate: stored once
        "{broken json\n",
        {**good, "event_id": "e2", "action": "dance"},
        {**good, "event_id": "e3", "ts": -5},
        {**good, "event_id": "e4", "ts": T0 + 3, "extra_field": "kept out"},
    ])
    _write(data, "comment_events.jsonl", [{"event_id": "ce1", "user_id": "u1", "comment_id": "c1", "video_id": "v1", "action": "like", "ts": T0 + 4}])

    prefix = "t-consumer."
    ensure_topics(kafka_bootstrap, prefix)
    sent = replay(data, kafka_bootstrap, prefix)
    assert sent["video_events"] == 6

    cfg = IngestConfig(eventlog=str(tmp_path / "log"), bootstrap=kafka_bootstrap, topic_prefix=prefix,
                       group="g1", until_idle_s=1.5, flush_interval_s=0.5)
    stats = ingest(cfg)
    log = EventLog(tmp_path / "log")
    assert log.ids("video_events") == {"e1", "e4"}
    assert log.counts() == {"videos": 1, "comments": 1, "video_events": 2, "comment_events": 1}
    assert stats["duplicates"] == 1
    assert stats["dead_letter_reasons"] == {"malformed_json": 1, "unknown_action": 1, "bad_timestamp": 1}

    # A restart of the same group resumes from committed offsets: nothing is read or stored again.
    again = ingest(cfg)
    assert again.get("consumed", 0) == 0
    assert log.count("video_events") == 2

    letters = read_topic(kafka_bootstrap, topic_names(prefix)["dead_letter"])
    assert len(letters) == 3
    by_reason = {dict(m.headers)["reason"].decode(): m.value for m in letters}
    assert by_reason["malformed_json"] == b"{broken json"


def test_a_consumer_out_of_the_group_too_long_is_replaced_and_ingests(tmp_path, kafka_bootstrap):
    from ingestion.consumer import Ingestor

    prefix = "t-rejoin."
    ensure_topics(kafka_bootstrap, prefix)
    data = tmp_path / "data"
    data.mkdir()
    _write(data, "video_events.jsonl", [{"event_id": f"e{i}", "user_id": f"u{i}", "video_id": "v1", "action": "like",
                                         "watch_ms": 10, "ts": T0 + i} for i in range(20)])
    for name in ("videos.jsonl", "comments.jsonl", "comment_events.jsonl"):
        _write(data, name, [])
    replay(data, kafka_bootstrap, prefix)
    ingestor = Ingestor(IngestConfig(eventlog=str(tmp_path / "log"), bootstrap=kafka_bootstrap, topic_prefix=prefix,
                                     group="g-rejoin", until_idle_s=1.5, flush_interval_s=0.5, rejoin_after_s=11))
    first = ingestor.consumer
    now = ingestor.out_of_group_since
    assert not ingestor.rejoin_if_stuck(now + 10)  # not out long enough
    assert ingestor.rejoin_if_stuck(now + 12)
    assert ingestor.consumer is not first and ingestor.stats["rejoins"] == 1
    stats = ingestor.run()  # the replacement joins the group and reads everything
    assert stats["stored"] == 20 and EventLog(tmp_path / "log").count("video_events") == 20
    assert ingestor.stats["rejoins"] == 1  # it joined: no second replacement
