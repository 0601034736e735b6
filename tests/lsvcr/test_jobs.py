"""Job submission pieces that need no running head: entrypoints, runtime_env, the head address."""

import pytest

from lsvcr import jobs


def test_entrypoint_runs_the_stage_command_with_quoted_overrides():
    assert jobs.entrypoint("finetune", ["epochs=1", "out=/a b"]) == \
        "python -m lsvcr.cli train finetune epochs=1 'out=/a b'"
    assert jobs.entrypoint("continuous", []) == "python -m lsvcr.cli continuous"
    assert jobs.entrypoint("features", ["configs/x.yaml", "seed=1"]) == \
        "python -m lsvcr.cli features build --config configs/x.yaml seed=1"
    with pytest.raises(ValueError, match="unknown stage"):
        jobs.entrypoint("serve-everything", [])
    with pytest.raises(ValueError, match="key=value"):
        jobs.entrypoint("features", ["incremental"])


def test_runtime_env_ships_the_project_without_state(monkeypatch):
    monkeypatch.setenv("LSVCR_KAFKA_BOOTSTRAP", "k1:9092,k2:9092")
    env = jobs.runtime_env("continuous")
    assert env["working_dir"] == str(jobs.PROJECT_ROOT)
    assert ".run/" in env["excludes"] and ".git/" in env["excludes"]
    assert env["env_vars"]["LSVCR_KAFKA_BOOTSTRAP"] == "k1:9092,k2:9092"
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > 3  # a stop lets the step finish
    assert "RAY_JOB_STOP_WAIT_TIME_S" not in jobs.runtime_env("features")["env_vars"]


def test_head_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.head_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.head_address() == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not the Jobs API
    assert jobs.head_address() == "http://127.0.0.1:8265"
    assert jobs.head_address("http://x:1") == "http://x:1"
