"""The thin end-to-end slice on 100 generated users: real broker, Ray Data, Ray Train and Ray Serve."""

import json

import httpx
import pyarrow.parquet as pq
import pytest

from core.contract import TASKS
from lsvcr.suite import SERVED_MODEL

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, kafka_bootstrap, ray_session):
    from devtools.generator import GeneratorConfig, generate
    from lsvcr.pipeline import PipelineConfig, run_pipeline

    root = tmp_path_factory.mktemp("e2e")
    generate(str(root / "data"), GeneratorConfig(users=100, seed=7))
    out = run_pipeline(PipelineConfig(data=str(root / "data"), work=str(root / "work"), results=str(root / "results.json"), epochs=2))
    return root, out


def test_every_valid_record_reaches_the_event_log(pipeline_run):
    root, out = pipeline_run
    data = root / "data"
    for table in ("videos", "comments", "video_events", "comment_events"):
        lines = sum(1 for line in open(data / f"{table}.jsonl") if line.strip())
        assert out["replayed"][table] == lines
        assert out["ingested"].get(f"stored_{table}", 0) == lines


def test_results_json_has_every_model_and_metric(pipeline_run):
    root, out = pipeline_run
    results = json.loads((root / "results.json").read_text())
    assert {"video", "comment", "protocol", "other_protocols"} <= set(results)
    assert results["protocol"] == "alive_window" and set(results["other_protocols"]) == {"uniform_all", "popularity_at_t"}
    # The time-aware baselines are always there (issue 8).
    assert {"popularity", "sasrec", "sr_no_align", SERVED_MODEL, "recency", "popularity_at_t",
            "recency_pop_blend"} <= set(results["video"])
    assert {"popularity", "sasrec", "sr_no_align", SERVED_MODEL, "newest", "most_engaged", "top_level"} <= set(
        results["comment"])
    for task in TASKS:
        for metrics in results[task].values():
            assert {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10"} <= set(metrics)
            assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0


def test_serve_answers_both_routes_and_rejects_bad_requests(pipeline_run):
    from serving.app import start, stop

    _, out = pipeline_run
    users = pq.read_table(f"{out['features']}/users.parquet", columns=["user_id"])["user_id"].to_pylist()
    videos = pq.read_table(f"{out['features']}/videos.parquet", columns=["video_id"])["video_id"].to_pylist()
    url = start(checkpoint=out["checkpoints"][SERVED_MODEL], features=out["features"], port=18765)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/v1/health").json()["status"] == "ok"
            reply = client.post("/v1/recommend/videos", json={"user_id": users[0], "k": 5})
            assert reply.status_code == 200
            body = reply.json()
            assert len(body["items"]) == 5 and body["cold_start"] is False
            scores = [item["score"] for item in body["items"]]
            assert scores == sorted(scores, reverse=True)

            cold = client.post("/v1/recommend/videos", json={"user_id": "nobody-like-this", "k": 3}).json()
            assert cold["cold_start"] is True and len(cold["items"]) == 3

            reply = client.post("/v1/recommend/comments", json={"user_id": users[0], "video_id": videos[0], "k": 3})
            assert reply.status_code == 200

            assert client.post("/v1/recommend/videos", json={"user_id": users[0], "k": 0}).status_code == 422
            assert client.post("/v1/recommend/videos", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
            assert client.post("/v1/recommend/comments", json={"user_id": users[0], "video_id": "no-such-video"}).status_code == 404
    finally:
        stop()
