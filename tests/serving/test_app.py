"""The Serve app on real Ray Serve: offline parity, registry hot swap under load, refusals, bad requests."""

import json
import threading
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ingestion.eventlog import EventLog
from ingestion.topics import ensure_topics, topic_names
from tests.serving.conftest import make_checkpoint
from trainers.registry import Registry

pytestmark = pytest.mark.integration
PORT = 18790
TOPIC_PREFIX = "t-serving."


@pytest.fixture(scope="module")
def served(tmp_path_factory, serving_features, kafka_bootstrap):
    from ingestion.sequence_store import SequenceStore
    from serving.app import start, stop

    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root / "registry")
    registry.publish(make_checkpoint(serving_features, root / "ckpt1", seed=1), serving_features)
    SequenceStore(root / "sequences.sqlite").close()  # the ingest consumer would create it
    ensure_topics(kafka_bootstrap, TOPIC_PREFIX)
    url = start(registry=str(root / "registry"), port=PORT, poll_s=0.2, access_log=False,
                sequence_store=str(root / "sequences.sqlite"), catalog_bootstrap=kafka_bootstrap,
                topic_prefix=TOPIC_PREFIX)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, registry, root
    stop()


@pytest.fixture(scope="module")
def direct(served):
    """A client of the replica's own HTTP port (Serve's direct ingress), the short path beside the proxy."""
    from serving.app import replica_urls

    urls = replica_urls()
    assert len(urls) == 1, urls
    with httpx.Client(base_url=urls[0], timeout=30) as client:
        yield client


def _wait_for_version(client, version, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/v1/model").json()["model_version"] == version:
            return
        time.sleep(0.1)
    raise AssertionError(f"app did not switch to {version} within {timeout_s}s")


def test_answers_match_offline_scoring(served, serving_features):
    from trainers.scoring import Scorer

    client, registry, _ = served
    _wait_for_version(client, registry.current())
    scorer = Scorer(registry.path(registry.current()), serving_features)
    users = pq.read_table(serving_features / "users.parquet").to_pylist()
    video_ids = pq.read_table(serving_features / "videos.parquet", columns=["video_id"])["video_id"].to_pylist()
    comments = pq.read_table(serving_features / "comments.parquet", columns=["comment_id", "video_idx"]).to_pylist()
    for user in users[:5]:
        hist = scorer.histories({k: [v] for k, v in user.items() if k.startswith("hist_")})
        offline = scorer.video_scores(hist)[0]
        top = torch.topk(offline, 10)
        body = client.post("/v1/recommend/videos", json={"user_id": user["user_id"], "k": 10, "exclude_seen": False}).json()
        assert [item["id"] for item in body["items"]] == [video_ids[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([item["score"] for item in body["items"]], top.values.numpy(), atol=1e-5)

        video = user["hist_video"][-1]
        candidates = [i for i, c in enumerate(comments) if c["video_idx"] == video]
        if not candidates:
            continue
        offline = scorer.comment_scores(hist, torch.tensor([video]), torch.tensor([candidates]))[0]
        order = torch.argsort(offline, descending=True, stable=True)[:3]
        body = client.post("/v1/recommend/comments", json={"user_id": user["user_id"], "video_id": video_ids[video], "k": 3}).json()
        assert [item["id"] for item in body["items"]] == [comments[candidates[i]]["comment_id"] for i in order.tolist()]
        np.testing.assert_allclose([item["score"] for item in body["items"]], offline[order].numpy(), atol=1e-5)


def test_the_replica_answers_on_its_own_loopback_port_as_through_the_proxy(served, direct, serving_features):
    import psutil

    client, _, _ = served
    port = direct.base_url.port
    assert direct.base_url.host == "127.0.0.1" and port != PORT
    bound = {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert bound == {"127.0.0.1"}  # nothing listens on other interfaces
    users = pq.read_table(serving_features / "users.parquet", columns=["user_id"])["user_id"].to_pylist()
    for body in ({"user_id": users[0], "k": 7, "exclude_seen": False}, {"user_id": "nobody-knows-me", "k": 3}):
        assert direct.post("/v1/recommend/videos", json=body).json() == client.post("/v1/recommend/videos", json=body).json()
    assert direct.get("/v1/model").json()["model_version"] == client.get("/v1/model").json()["model_version"]


def test_hot_swap_under_load_fails_no_request(served, direct, serving_features):
    client, registry, root = served
    user = pq.read_table(serving_features / "users.parquet", columns=["user_id"])["user_id"][0].as_py()
    old = registry.current()
    results, stop = [], threading.Event()

    def load(url):
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set() and len(results) < 5000:
                sent = time.monotonic()
                r = c.post("/v1/recommend/videos", json={"user_id": user, "k": 5})
                results.append((sent, r.status_code, r.json().get("model_version") if r.status_code == 200 else None))

    # half the clients through the proxy, half straight to the replica
    threads = [threading.Thread(target=load, args=(str(c.base_url),)) for c in (client, direct, client, direct)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    new = registry.publish(make_checkpoint(serving_features, root / "ckpt-swap", seed=2), serving_features)
    _wait_for_version(client, new)
    swapped_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert new != old
    assert len(results) > 20
    assert [r for r in results if r[1] != 200] == []
    assert {r[2] for r in results if r[0] < swapped_at} <= {old, new}
    after = [r[2] for r in results if r[0] > swapped_at]
    assert after and set(after) == {new}


def test_version_that_does_not_fit_is_refused_and_old_one_keeps_serving(served, serving_features):
    client, registry, root = served
    good = registry.current()
    _wait_for_version(client, good)
    # Loads fine on its own (so the registry takes it) but its text size does not fit the features folder.
    bad = registry.publish(make_checkpoint(serving_features, root / "ckpt-misfit", seed=3, text_dim=7), serving_features)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = client.get("/v1/model").json()
        if any(r["version"] == bad for r in info["refused_versions"]):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("misfit version was not refused")
    assert info["model_version"] == good
    reply = client.post("/v1/recommend/videos", json={"user_id": "anyone", "k": 2})
    assert reply.status_code == 200 and reply.json()["model_version"] == good
    registry.rollback(to=good)


def test_rollback_is_followed(served, serving_features):
    client, registry, root = served
    first, current = registry.versions()[0], registry.current()
    registry.rollback(to=first)
    _wait_for_version(client, first)
    registry.rollback(to=current)
    _wait_for_version(client, current)


def _start_ingest(kafka_bootstrap, root):
    """The real consumer group, writing the event log and the sequence store the app reads, in a thread.
    Returns (ingestor, thread, result) once the consumer holds its partitions, so the 5 s budget excludes its
    start. Its idle stop is off (an hour) until the caller lowers ingestor.config.until_idle_s (run() reads it
    on every loop): the caller knows when its event is in, a fixed idle time would only be waited out."""
    from ingestion.consumer import IngestConfig, Ingestor

    config = IngestConfig(eventlog=str(root / "eventlog"), bootstrap=kafka_bootstrap, group="t-serving-ingest",
                          topic_prefix=TOPIC_PREFIX, sequence_store=str(root / "sequences.sqlite"),
                          until_idle_s=3600.0, instance_id="serving-test")
    ingestor = Ingestor(config)
    result = {}
    thread = threading.Thread(target=lambda: result.update(ingestor.run()), daemon=True)
    thread.start()
    stats = config.state_dir / "consumers" / "serving-test.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if stats.is_file() and json.loads(stats.read_text())["assigned"]:
            return ingestor, thread, result
        time.sleep(0.1)
    raise AssertionError("the ingest consumer got no partitions within 30s")


def test_an_event_produced_to_kafka_changes_the_users_history_within_5_seconds(served, serving_features,
                                                                                 kafka_bootstrap):
    from kafka import KafkaProducer

    client, _, root = served
    user = pq.read_table(serving_features / "users.parquet", columns=["user_id"])["user_id"][1].as_py()
    before = client.get(f"/v1/users/{user}/history").json()
    assert before["source"] == "snapshot" and before["videos"]
    videos = pq.read_table(serving_features / "videos.parquet", columns=["video_id"])["video_id"].to_pylist()
    watched = next(v for v in videos if v != before["videos"][-1])
    ingestor, thread, result = _start_ingest(kafka_bootstrap, root)
    try:
        event = {"event_id": "fresh-1", "user_id": user, "video_id": watched, "action": "finish", "watch_ms": None,
                 "ts": 1_800_000_000_000}
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        producer.send(topic_names(TOPIC_PREFIX)["video_events"], key=user.encode(), value=json.dumps(event).encode())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = client.get(f"/v1/users/{user}/history").json()
            if now["source"] == "store":
                break
            time.sleep(0.05)
        assert now["source"] == "store" and now["videos"] == [watched]
        seen = client.post("/v1/recommend/videos", json={"user_id": user, "k": 100}).json()["items"]
        assert watched not in [item["id"] for item in seen]  # exclude_seen uses the fresh history
    finally:
        ingestor.config.until_idle_s = 1.0  # the event is in (or the test failed): stop once idle and caught up
    thread.join(timeout=60)
    assert not thread.is_alive() and result["consumed"] >= 1
    logged = EventLog(root / "eventlog").read("video_events", columns=["event_id"])["event_id"].to_pylist()
    assert logged.count("fresh-1") == 1  # the event log holds it too, once


def test_a_new_video_from_kafka_is_recommended_within_10_seconds(served, serving_features, kafka_bootstrap):
    from kafka import KafkaProducer

    client, _, _ = served
    user = pq.read_table(serving_features / "users.parquet", columns=["user_id"])["user_id"][2].as_py()
    videos = pq.read_table(serving_features / "videos.parquet").to_pylist()
    ranked = client.post("/v1/recommend/videos", json={"user_id": user, "k": 100, "exclude_seen": False}).json()["items"]
    twin = ranked[0]  # the user's favourite; a new video with its text must rank right beside it
    twin_video = next(v for v in videos if v["video_id"] == twin["id"])
    record = {"video_id": "fresh-video", "title": twin_video["title"], "tags": twin_video["tags"],
              "author_id": "someone", "ts": 1_800_000_000_000}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(topic_names(TOPIC_PREFIX)["videos"], key=b"fresh-video", value=json.dumps(record).encode())
    producer.flush()
    producer.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        items = client.post("/v1/recommend/videos", json={"user_id": user, "k": 2, "exclude_seen": False}).json()["items"]
        if "fresh-video" in [item["id"] for item in items]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"new video not recommended within 10s: {client.get('/v1/model').json()}")
    fresh = next(item for item in items if item["id"] == "fresh-video")
    assert fresh["text"] == twin_video["title"]
    assert abs(fresh["score"] - twin["score"]) < 1e-4


BAD_REQUESTS = [
    ("POST", "/v1/recommend/videos", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("POST", "/v1/recommend/videos", {"json": {"k": 5}}, 422),  # missing user_id
    ("POST", "/v1/recommend/videos", {"json": {"user_id": 12, "k": 5}}, 422),  # wrong type
    ("POST", "/v1/recommend/videos", {"json": {"user_id": "u", "k": "5"}}, 422),  # number as string
    ("POST", "/v1/recommend/videos", {"json": {"user_id": "u", "k": 0}}, 422),  # k too small
    ("POST", "/v1/recommend/videos", {"json": {"user_id": "u", "k": 10_000}}, 422),  # k too large
    ("POST", "/v1/recommend/videos", {"json": {"user_id": "", "k": 5}}, 422),  # empty id
    ("POST", "/v1/recommend/videos", {"json": {"user_id": "u", "k": 5, "surprise": 1}}, 422),  # unknown field
    ("POST", "/v1/recommend/videos", {"json": ["u", 5]}, 422),  # not an object
    ("POST", "/v1/recommend/videos", {"content": b'{"user_id": "' + b"x" * 20000 + b'"}', "headers": {"content-type": "application/json"}}, 413),
    ("POST", "/v1/recommend/comments", {"json": {"user_id": "u", "video_id": "no-such-video"}}, 404),
    ("POST", "/v1/recommend/comments", {"json": {"user_id": "u"}}, 422),  # missing video_id
    ("GET", "/v1/recommend/videos", {}, 405),
    ("POST", "/v1/recommend/nothing", {"json": {}}, 404),
]


@pytest.mark.parametrize("method,path,kwargs,status", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(served, direct, method, path, kwargs, status):
    client, _, _ = served
    for c in (client, direct):
        reply = c.request(method, path, **kwargs)
        assert reply.status_code == status, c.base_url
        assert reply.json()["detail"]
