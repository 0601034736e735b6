"""Helpers of the ingestion integration tests."""

import time

from kafka import KafkaConsumer, TopicPartition


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list:
    """Every record in `topic` now: read from the beginning up to the end offsets taken at the start.

    A consumer_timeout_ms read would wait out its whole timeout after the last record; this stops at the end
    (what the producers of the test flushed before it is called) and fails if it cannot get there in time."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} to its end within {timeout_s}s"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()
