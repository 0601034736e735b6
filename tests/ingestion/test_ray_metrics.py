"""A consumer running inside Ray exports its counters as Prometheus metrics through Ray's metrics agent."""

import json
import time

import httpx
import pytest
from kafka import KafkaProducer

from ingestion.consumer import IngestConfig, ingest
from ingestion.topics import ensure_topics, topic_names

pytestmark = pytest.mark.integration


def _metric(text: str, name: str, label: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def _ingest_in_worker(cfg: IngestConfig) -> tuple[dict, str]:
    import ray

    return ingest(cfg), ray.get_runtime_context().get_worker_id()


def test_consumer_in_a_ray_task_exports_prometheus_metrics(tmp_path, kafka_bootstrap, ray_session):
    ray = ray_session
    prefix = "t-metrics."
    ensure_topics(kafka_bootstrap, prefix)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    topic = topic_names(prefix)["video_events"]
    for i in range(50):
        event = {"event_id": f"m{i}", "user_id": "u1", "video_id": "v1", "action": "like", "watch_ms": 1,
                 "ts": 1_700_000_000_000 + i}
        producer.send(topic, key=b"u1", value=json.dumps(event).encode())
    producer.send(topic, key=b"u1", value=b"{not json")
    producer.flush()
    producer.close()

    cfg = IngestConfig(eventlog=str(tmp_path / "log"), bootstrap=kafka_bootstrap, topic_prefix=prefix,
                       group="metrics", until_idle_s=1.0)
    result, worker = ray.get(ray.remote(num_cpus=0.5)(_ingest_in_worker).remote(cfg))
    assert result["stored"] == 50

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60  # the agent exports on an interval of a few seconds
    stored = dead = None
    while time.monotonic() < deadline and (stored is None or dead is None):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        # Other consumers in this test session (in the driver) export the same names: read this worker's.
        ours = "\n".join(line for line in text.splitlines() if f'WorkerId="{worker}"' in line)
        stored = _metric(ours, "ray_lsvcr_ingest_stored_events_total", 'table="video_events"')
        dead = _metric(ours, "ray_lsvcr_ingest_dead_letters_total", 'reason="malformed_json"')
        time.sleep(1)
    assert (stored, dead) == (50.0, 1.0)
