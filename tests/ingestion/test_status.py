import json

import pytest

from ingestion.consumer import IngestConfig, ingest
from ingestion.status import format_status, ingest_status, partition_lag
from ingestion.topics import ensure_topics, topic_names


def test_partition_lag_counts_uncommitted_partitions_from_zero():
    rows = partition_lag({("t", 0): 7, ("t", 1): None}, {("t", 0): 10, ("t", 1): 4, ("u", 0): 0})
    assert [(r["topic"], r["partition"], r["lag"]) for r in rows] == [("t", 0, 3), ("t", 1, 4), ("u", 0, 0)]


@pytest.mark.integration
def test_status_after_ingest_shows_zero_lag_and_dead_letters(tmp_path, kafka_bootstrap):
    from kafka import KafkaProducer

    prefix = "t-status."
    ensure_topics(kafka_bootstrap, prefix)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    topic = topic_names(prefix)["video_events"]
    for i in range(5):
        event = {"event_id": f"e{i}", "user_id": f"u{i}", "video_id": "v", "action": "like", "ts": 1_700_000_000_000}
        producer.send(topic, key=f"u{i}".encode(), value=json.dumps(event).encode())
    producer.send(topic, key=b"u0", value=b"not json")
    producer.flush()
    producer.close()
    ingest(IngestConfig(eventlog=str(tmp_path), bootstrap=kafka_bootstrap, topic_prefix=prefix, group="st",
                        until_idle_s=1.0, flush_interval_s=0.3))
    status = ingest_status(tmp_path, kafka_bootstrap, group="st", topic_prefix=prefix)
    events = [r for r in status["partitions"] if r["topic"] == topic]
    assert len(events) == 4  # events.video has 4 partitions
    assert sum(r["end"] for r in events) == 6 and status["total_lag"] == 0
    assert status["dead_letters"] == {"malformed_json": 1}
    assert status["sequence_store"]["video_rows"] == 5
    assert "malformed_json=1" in format_status(status)
