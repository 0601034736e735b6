"""`lsvcr jobs submit|status|logs|stop`: the long-running stages as Ray Jobs on a running head.

    job_id = submit("continuous", ["workdir=/shared/cont", "registry=/shared/registry"])
    status(job_id); logs(job_id); stop(job_id)

The project folder travels as the job's working_dir (runtime_env), without run-time state and caches, so
a laptop can submit to a cluster that does not have this checkout. The head is RAY_ADDRESS when set to an
http address, else http://127.0.0.1:8265 (the dashboard of `ray start --head`).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from core.paths import PROJECT_ROOT

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# stage -> the `lsvcr` command that runs it, as `python -m lsvcr.cli COMMAND [--config F.yaml] key=value ...`
STAGES = {
    "continuous": ("continuous",),
    "align": ("train", "align"),
    "finetune": ("train", "finetune"),
    "features": ("features", "build"),
}
# Never shipped: run-time state, caches, build outputs and data (Ray caps working_dir uploads at 500 MiB).
EXCLUDES = [".run/", ".git/", "benchmarks/results/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/",
            "data/", "*.parquet", "*.npy", "*.safetensors", "*.jsonl", "*.gguf", "devtools/kafka/*.jar",
            "devtools/kafka/libs/"]
# Passed from the submitting shell to the job when set there.
PASSED_ENV = ("HF_HUB_OFFLINE", "LSVCR_KAFKA_BOOTSTRAP", "LSVCR_RUN_DIR", "LSVCR_CACHE_DIR", "LSVCR_RAY_CPUS",
              "TOKENIZERS_PARALLELISM")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def head_address(address: str | None = None) -> str:
    """The Jobs API address: the argument, an http RAY_ADDRESS, or the local default."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith("http") else DEFAULT_ADDRESS


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head_address(address))


def python_for(address: str) -> str:
    """A head on this machine runs jobs with this interpreter (the venv); a remote head with the `python` on
    its PATH (cluster.yaml puts the venv there)."""
    host = address.split("://", 1)[-1].split(":", 1)[0]
    return sys.executable if host in ("127.0.0.1", "localhost") else "python"


def entrypoint(stage: str, overrides: list[str], python: str = "python") -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    bad = [o for o in overrides if "=" not in o and not o.endswith((".yaml", ".yml"))]
    if bad:
        raise ValueError(f"overrides must be key=value (or one config .yaml first), got {bad}")
    config = ["--config", overrides[0]] if overrides and "=" not in overrides[0] else []
    args = [*STAGES[stage], *config, *overrides[len(config) // 2:]]
    return " ".join([shlex.quote(python), "-m", "lsvcr.cli", *(shlex.quote(a) for a in args)])


def runtime_env(stage: str, env: dict[str, str] | None = None, working_dir: str | Path = PROJECT_ROOT) -> dict:
    env_vars = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env_vars.setdefault("HF_HUB_OFFLINE", "1")
    if stage == "continuous":
        # A stop (SIGTERM) lets the current step finish before Ray escalates to SIGKILL (default 3 s).
        env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = "900"
    env_vars.update(env or {})
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}


def submit(stage: str, overrides: list[str] | None = None, address: str | None = None,
           env: dict[str, str] | None = None, job_id: str | None = None,
           working_dir: str | Path = PROJECT_ROOT) -> str:
    """Submit a stage as a Ray Job; returns its submission id."""
    overrides = list(overrides or [])
    client = _client(address)
    python = python_for(head_address(address))
    return client.submit_job(entrypoint=entrypoint(stage, overrides, python), submission_id=job_id,
                             runtime_env=runtime_env(stage, env, working_dir),
                             metadata={"lsvcr_stage": stage})


def status(job_id: str, address: str | None = None) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str(_client(address).get_job_status(job_id).value)


def info(job_id: str, address: str | None = None) -> dict:
    details = _client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(details.status.value), "entrypoint": details.entrypoint,
            "message": details.message, "start_time": details.start_time, "end_time": details.end_time}


def list_jobs(address: str | None = None) -> list[dict]:
    return [{"job_id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint}
            for j in _client(address).list_jobs()]


def logs(job_id: str, address: str | None = None) -> str:
    return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the job to stop (SIGTERM to its process group); True if it was running."""
    return bool(_client(address).stop_job(job_id))


def wait(job_id: str, address: str | None = None, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
    """Wait until the job ends; returns its final status (TimeoutError after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(job_id, address)
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
