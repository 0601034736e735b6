"""Continuous training as a Ray Job on a local head: events in, versions out, Serve follows; restart safety.

Starts its own `ray start --head` on private ports (never the default ones, so another Ray on this machine
is untouched) and stops exactly that head at the end.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from devtools.generator import GeneratorConfig, generate
from ingestion.replay import replay
from ingestion.topics import ensure_topics
from lsvcr import jobs

pytestmark = pytest.mark.integration

GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 6390, 8275, 18542
HEAD = f"http://127.0.0.1:{DASHBOARD_PORT}"
FILES = ("videos.jsonl", "comments.jsonl", "video_events.jsonl", "comment_events.jsonl")
SMALL = ["features.encoder=hash", "features.encoder_dim=16", "features.max_history=10", "features.num_negatives=20",
         "every_examples=40", "every_minutes=0", "poll_s=1", "valid_examples=15", "holdout_examples=15",
         "min_train_examples=20", "finetune.epochs=1", "finetune.patience=1", "finetune.num_workers=1",
         "finetune.batch_size=64", "finetune.size.max_history=10", "max_eval_examples=200", "margin=1.0"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    temp = tmp_path_factory.mktemp("ray")
    # Loopback only, so no token: Ray >= 2.5x turns token auth on for `ray start` unless told otherwise.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    ports = ["--port", str(GCS_PORT), "--dashboard-port", str(DASHBOARD_PORT), "--ray-client-server-port", "10011",
             "--node-manager-port", "6391", "--object-manager-port", "6392", "--dashboard-agent-grpc-port", "6393",
             "--dashboard-agent-listen-port", "6394", "--metrics-export-port", "6395",
             "--runtime-env-agent-port", "6396", "--min-worker-port", "20400", "--max-worker-port", "20599"]
    subprocess.run([*ray_cli, "start", "--head", *ports, "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
                    "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", str(temp),
                    "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                jobs.list_jobs(HEAD)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield HEAD
    finally:
        _stop_processes_under(temp)


def _stop_processes_under(temp: Path) -> None:
    """Stop this head only: the processes whose command line names its temp folder (`ray stop` would stop
    every Ray on the machine). Its workers exit with their raylet."""
    def ours():
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(temp) in cmdline.read_bytes().decode(errors="replace"):
                    pids.append(int(cmdline.parent.name))
            except OSError:
                pass
        return pids

    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s  # until they are gone, not a fixed sleep
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """A tiny generated dataset cut in two by time: what arrives first and what arrives later."""
    root = tmp_path_factory.mktemp("data")
    generate(root / "all", GeneratorConfig(users=80, seed=5, days=6, min_videos=60, comments_per_video=4))
    rows = {name: [json.loads(line) for line in (root / "all" / name).read_text().splitlines() if line.strip()]
            for name in FILES}
    event_ts = sorted(r["ts"] for r in rows["video_events.jsonl"])
    middle = event_ts[len(event_ts) * 3 // 5]
    for part, keep in (("a", lambda t: t < middle), ("b", lambda t: t >= middle)):
        (root / part).mkdir()
        for name in FILES:
            lines = [json.dumps(r) for r in rows[name] if keep(r["ts"])]
            (root / part / name).write_text("\n".join(lines) + "\n")
    return root / "a", root / "b"


def _wait(check, timeout_s: float, what: str, job: str | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if job and jobs.status(job, HEAD) in jobs.TERMINAL:
            raise AssertionError(f"job {job} ended while waiting for {what}:\n{jobs.logs(job, HEAD)[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                         + (f":\n{jobs.logs(job, HEAD)[-4000:]}" if job else ""))


def _current(registry: Path) -> str | None:
    try:
        return (registry / "CURRENT").read_text().strip() or None
    except FileNotFoundError:
        return None


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_continuous_job_publishes_and_serve_follows(ray_head, kafka_bootstrap, slices, tmp_path):
    prefix = "cont-e2e."
    ensure_topics(kafka_bootstrap, prefix)
    workdir, registry = tmp_path / "continuous", tmp_path / "registry"
    job = jobs.submit("continuous", [f"workdir={workdir}", f"registry={registry}", f"bootstrap={kafka_bootstrap}",
                                     f"topic_prefix={prefix}", "group=cont-e2e", *SMALL], address=HEAD)
    serve_job = None
    try:
        replay(slices[0], kafka_bootstrap, prefix)
        _wait(lambda: _current(registry) == "v0001", 240, "the first published version", job)

        serve_job = jobs._client(HEAD).submit_job(
            entrypoint=f"{sys.executable} -c \"from serving.app import serve_forever; serve_forever(registry='{registry}', "
                       f"port={SERVE_PORT}, poll_s=0.5)\"",
            runtime_env=jobs.runtime_env("serve"))
        url = f"http://127.0.0.1:{SERVE_PORT}"

        def healthy():
            try:
                return httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 120, "the Serve app", serve_job)
        failures, versions, done = [], set(), threading.Event()

        def hammer():
            with httpx.Client(timeout=10) as client:
                while not done.is_set():
                    try:
                        r = client.post(f"{url}/v1/recommend/videos", json={"user_id": "u000001", "k": 5})
                    except httpx.HTTPError as err:  # a dropped connection is a failed request too
                        failures.append(repr(err))
                    else:
                        if r.status_code != 200:
                            failures.append(r.status_code)
                        else:
                            versions.add(r.json()["model_version"])
                    time.sleep(0.05)

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        replay(slices[1], kafka_bootstrap, prefix)
        _wait(lambda: _current(registry) not in (None, "v0001"), 240, "a second published version", job)
        second = _current(registry)
        _wait(lambda: second in versions, 30, f"Serve answering with {second}")
        done.set()
        thread.join(timeout=20)
        assert failures == []
        assert {"v0001", second} <= versions

        assert jobs.stop(job, HEAD)
        assert jobs.wait(job, HEAD, timeout_s=120) == "STOPPED"
        assert "continuous" in jobs.logs(job, HEAD) and "stopped:" in jobs.logs(job, HEAD)  # a clean exit
        published = [m for m in _metrics(workdir) if m["decision"] == "published"]
        assert len(published) >= 2
        assert all(m["train_s"] > 0 and m["candidate_ndcg@5"] is not None for m in published)
    finally:
        for j in (job, serve_job):
            if j and jobs.status(j, HEAD) not in jobs.TERMINAL:
                jobs.stop(j, HEAD)
                jobs.wait(j, HEAD, timeout_s=60)


def test_killed_mid_training_resumes_without_retraining_a_window(ray_head, kafka_bootstrap, slices, tmp_path):
    prefix = "cont-restart."
    ensure_topics(kafka_bootstrap, prefix)
    workdir, registry = tmp_path / "continuous", tmp_path / "registry"
    overrides = [f"workdir={workdir}", f"registry={registry}", f"bootstrap={kafka_bootstrap}",
                 f"topic_prefix={prefix}", "group=cont-restart", *SMALL]
    state_path = workdir / "state.json"

    def state():
        return json.loads(state_path.read_text()) if state_path.exists() else {}

    job = jobs.submit("continuous", overrides, address=HEAD)
    replay(slices[0], kafka_bootstrap, prefix)
    _wait(lambda: state().get("trained_cycles", 0) >= 1 and not state().get("pending"), 420, "cycle 1", job)
    first_cut = state()["trained_cut"]
    replay(slices[1], kafka_bootstrap, prefix)
    _wait(lambda: state().get("in_progress"), 420, "cycle 2 to start training", job)
    os.killpg(os.getpgid(state()["pid"]), signal.SIGKILL)  # the driver and its consumer, mid-training
    _wait(lambda: jobs.status(job, HEAD) in jobs.TERMINAL, 60, "the killed job to end")

    again = jobs.submit("continuous", [*overrides, "max_cycles=2"], address=HEAD)
    try:
        assert jobs.wait(again, HEAD, timeout_s=420) == "SUCCEEDED", jobs.logs(again, HEAD)[-4000:]
        log = jobs.logs(again, HEAD)
        assert "resuming" in log and "will be trained once" in log
        cycles = _metrics(workdir)
        cuts = [m["window"]["cut"] for m in cycles]
        assert len(cycles) == 2 and len(set(cuts)) == 2  # two windows, each trained once
        assert cuts[0] == first_cut and cuts[1] > first_cut
        assert state()["in_progress"] is None and state()["trained_cycles"] == 2
    finally:
        if jobs.status(again, HEAD) not in jobs.TERMINAL:
            jobs.stop(again, HEAD)
