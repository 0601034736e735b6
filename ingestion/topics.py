"""Topic names and creation. Events are keyed by user_id and catalog records by item id (DESIGN.md 4)."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from ingestion.schema import DEAD_LETTER_TOPIC, TABLES, TOPIC_OF

# Several partitions per event topic so several consumers can share the load (issue 3 scales this out).
PARTITIONS = {"catalog.videos": 2, "catalog.comments": 2, "events.video": 4, "events.comment": 4, DEAD_LETTER_TOPIC: 1}


def topic_names(prefix: str = "") -> dict[str, str]:
    """table -> topic, with an optional prefix that lets tests and tenants share one broker."""
    names = {table: prefix + TOPIC_OF[table] for table in TABLES}
    names["dead_letter"] = prefix + DEAD_LETTER_TOPIC
    return names


def ensure_topics(bootstrap: str, prefix: str = "") -> list[str]:
    """Create any missing topic; returns the ones created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lsvcr-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name=prefix + base, num_partitions=n, replication_factor=1)
            for base, n in PARTITIONS.items()
            if prefix + base not in existing
        ]
        created = []
        for topic in wanted:  # one at a time so a concurrent creator does not fail the whole batch
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
