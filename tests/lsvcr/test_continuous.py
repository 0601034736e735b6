"""The continuous job: its config (nested features and fine-tuning configs), failed-step retries, windows_uri."""

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, from_dict, load_config, to_dict
from core.contract import TASKS
from lsvcr.continuous import NO_SPLIT_TS, ContinuousConfig, ContinuousTrainer


def test_config_validation(monkeypatch):
    monkeypatch.delenv("LSVCR_KAFKA_BOOTSTRAP", raising=False)  # the session broker's fixture may have set it
    with pytest.raises(ConfigError, match="bootstrap"):
        ContinuousConfig(workdir="w", registry="r", bootstrap="", consume=True)
    with pytest.raises(ConfigError, match="every_examples"):
        ContinuousConfig(workdir="w", registry="r", consume=False, every_examples=0)
    with pytest.raises(ConfigError, match="workdir='s3://bucket/w': must be a file system path.*SQLite"):
        ContinuousConfig(workdir="s3://bucket/w", registry="r", consume=False)
    with pytest.raises(ConfigError, match="eventlog='gs://b/log': must be a file system path"):
        ContinuousConfig(workdir="w", eventlog="gs://b/log", registry="r", consume=False)
    with pytest.raises(ConfigError, match="windows_uri: give another location"):
        ContinuousConfig(workdir="w", registry="r", consume=False, windows_uri="w/windows/")
    assert ContinuousConfig(workdir="w", registry="r", consume=False,
                            windows_uri="s3://b/windows").windows_uri == "s3://b/windows"
    assert ContinuousConfig(workdir="w", registry="s3://bucket/r", consume=False).registry == "s3://bucket/r"
    with pytest.raises(ConfigError, match="features.negative_window_ms must be >= 1 .*, got 0"):
        load_config(ContinuousConfig, None, ["workdir=w", "registry=r", "consume=false", "features.negative_window_ms=0"])
    with pytest.raises(ConfigError, match="finetune.size.max_history must be <= features.max_history"):
        load_config(ContinuousConfig, None, ["workdir=w", "registry=r", "consume=false", "features.max_history=10",
                                             "finetune.size.max_history=20"])
    with pytest.raises(ConfigError, match="unknown keys \\['lr'\\]"):
        load_config(ContinuousConfig, None, ["workdir=w", "registry=r", "consume=false", "lr=3e-4"])


def test_nested_overrides_keep_the_jobs_own_defaults():
    config = load_config(ContinuousConfig, None, ["workdir=w", "registry=r", "consume=false", "finetune.lr=3e-4",
                                                  "features.encoder=hash", "finetune.size.hidden=32"])
    assert config.finetune.lr == 3e-4 and config.finetune.size.hidden == 32
    # The job's own defaults stay where a key was not given (FinetuneConfig's own are 10 epochs, patience 2).
    assert (config.finetune.epochs, config.finetune.patience) == (2, 1)
    assert config.features.encoder == "hash" and config.features.negative_window_ms == 7 * 24 * 3_600_000
    # The paths and the split are the job's.
    assert config.features.eventlog == str(Path("w") / "eventlog") and config.features.out == str(Path("w") / "features")
    assert config.features.incremental and config.features.split_test_ts == NO_SPLIT_TS
    # What crosses into a Ray job comes back the same.
    assert from_dict(ContinuousConfig, to_dict(config)) == config


def test_a_failed_step_is_retried_and_too_many_in_a_row_stop_the_job(tmp_path, capsys):
    trainer = ContinuousTrainer(ContinuousConfig(workdir=str(tmp_path), registry=str(tmp_path / "r"), consume=False,
                                                 max_failed_steps=2))
    outcomes = iter([OSError("disk hiccup"), None, ValueError("bad batch"), ValueError("again")])

    def step():
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    trainer.step = step
    trainer._step_or_retry()
    assert trainer.failed_steps == 1 and "OSError: disk hiccup" in capsys.readouterr().out
    trainer._step_or_retry()  # a success resets the count
    assert trainer.failed_steps == 0
    trainer._step_or_retry()
    with pytest.raises(ValueError, match="again"):
        trainer._step_or_retry()
    assert trainer.failed_steps == 2


def test_benchmark_stamps_records_with_now_in_their_order(tmp_path):
    from benchmarks.continuous import FILES, stamp_now

    source = tmp_path / "src"
    source.mkdir()
    ts = {"videos.jsonl": [5, 50], "comments.jsonl": [7], "video_events.jsonl": [10, 60], "comment_events.jsonl": [55]}
    for name, values in ts.items():
        (source / name).write_text("".join(json.dumps({"ts": t, "orig": t}) + "\n" for t in values))
    before = int(time.time() * 1000)
    newest = stamp_now(source, tmp_path / "out")
    rows = sorted((json.loads(line) for name in FILES for line in (tmp_path / "out" / name).read_text().splitlines()),
                  key=lambda r: r["ts"])
    assert [r["orig"] for r in rows] == [5, 7, 10, 50, 55, 60]  # the original order, kept
    assert [r["ts"] for r in rows] == list(range(newest - 5, newest + 1))  # 1 ms apart, the newest now
    assert before <= newest <= int(time.time() * 1000)


def test_windows_uri_carries_each_window_to_the_workers(tmp_path, monkeypatch):
    """With windows_uri, fine-tuning is given the uploaded window (what a worker on another node reads: its own
    local copy of the URI), and the upload is removed once the cycle is trained."""
    from pathlib import Path

    from core import storage
    from features.folder import FeaturesFolder
    from trainers.registry import Registry

    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"memory://windows-{tmp_path.name}/lsvcr"
    trainer = ContinuousTrainer(ContinuousConfig(workdir=str(tmp_path / "w"), registry=str(tmp_path / "r"),
                                                 consume=False, windows_uri=uri))
    trainer.workdir.mkdir()
    trainer.registry = Registry(tmp_path / "r")  # empty, and no init: training starts from scratch
    for task in TASKS:
        folder = trainer.features / "examples" / task / "train"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"ts": pa.array([10, 20, 30, 40], pa.int64()), "target": [0, 1, 2, 3]}),
                       folder / "part-a.parquet")
    np.save(trainer.features / "video_emb.npy", np.arange(8, dtype=np.float32).reshape(4, 2))
    (trainer.features / "manifest.json").write_text(json.dumps({"num_videos": 4}))
    seen = {}

    def fake_finetune(config):
        seen["features"] = config.features
        copy = FeaturesFolder(config.features).root
        seen["files"] = storage.list_files(str(copy))
        seen["emb"] = np.load(copy / "video_emb.npy")
        seen["test"] = pq.read_table(copy / "examples" / "video" / "test").column("target").to_pylist()
        Path(config.out).mkdir(parents=True)
        return config.out

    monkeypatch.setattr("lsvcr.continuous.finetune", fake_finetune)
    monkeypatch.setattr(trainer, "_finish_pending", lambda: None)
    trainer.cycle({"train_from": 0, "valid_from": 20, "test_from": 30, "cut": 40}, "examples", 4, 0.0)
    window = trainer.workdir / "windows" / "c00001-40"
    assert seen["features"] == f"{uri}/c00001-40"
    assert seen["files"] == storage.list_files(str(window)) and "manifest.json" in seen["files"]
    assert np.array_equal(seen["emb"], np.arange(8, dtype=np.float32).reshape(4, 2)) and seen["test"] == [3]
    assert storage.kind(seen["features"]) == "missing"  # removed after training
    assert trainer.state["pending"]["window"] == str(window) and window.is_dir()  # evaluation reads the local one
