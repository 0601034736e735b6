import json

import numpy as np
import pytest
import torch

from core.config import ConfigError, load_config
from core.contract import TASKS
from features.folder import FeaturesFolder
from trainers.checkpoint import load_model
from trainers.evaluate import evaluate
from trainers.finetune import FinetuneConfig, finetune, seen_items
from trainers.metrics import METRIC_NAMES
from trainers.models import ModelSize
from trainers.scoring import Scorer


def test_config_from_overrides_and_validation():
    config = load_config(FinetuneConfig, None, ["features=/f", "out=/o", "epochs=3", "init=none", "lr=0.01"])
    assert (config.epochs, config.init, config.lr, config.model) == (3, None, 0.01, "sr")
    with pytest.raises(ValueError, match="model"):
        FinetuneConfig(features="/f", out="/o", model="bert")
    with pytest.raises(ValueError, match="text_only"):
        FinetuneConfig(features="/f", out="/o", model="sasrec", text_only=True)
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneConfig(features="/f", out="/o", batch_size=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(FinetuneConfig, None, ["features=/f", "out=/o", "epoch=3"])
    # The model size is one nested config, reached with dotted keys; a bad value names its key.
    config = load_config(FinetuneConfig, None, ["features=/f", "out=/o", "size.hidden=128", "size.max_history=20"])
    assert config.size == ModelSize(hidden=128, max_history=20)
    with pytest.raises(ConfigError, match=r"size: ModelSize.hidden must be divisible by num_heads 3"):
        load_config(FinetuneConfig, None, ["features=/f", "out=/o", "size.hidden=64", "size.num_heads=3"])
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(FinetuneConfig, None, ["features=/f", "out=/o", "hidden=128"])


def test_seen_items_by_hand(tmp_path, features_writer):
    write_examples, write_embeddings = features_writer
    write_embeddings(tmp_path, np.zeros((6, 2)), np.zeros((8, 2)))
    empty = {"hist_video_ts": [], "hist_cmt_ts": []}
    write_examples(tmp_path, "video", "train", [{
        "user_id": "u", "event_id": "e1", "ts": 5, "target": 1, "negatives": [2], "hist_video": [0],
        "hist_video_hot": [3], "hist_cmt_video": [], "hist_cmt_comments": [], **empty}])
    write_examples(tmp_path, "comment", "train", [{
        "user_id": "u", "event_id": "e2", "ts": 6, "query_video": 4, "target": 5, "negatives": [6],
        "hist_video": [1], "hist_video_hot": [-1], "hist_cmt_video": [3], "hist_cmt_comments": [7, -1, -1],
        "target_likes": 0, "negative_likes": [0], **empty}])
    videos, comments = seen_items(FeaturesFolder(tmp_path), 6, 8)
    # Video 1: the target of one example and in the other's history; -1 ("no hot comment") counts nothing.
    assert videos.tolist() == [1, 2, 1, 1, 1, 0]
    assert np.flatnonzero(comments).tolist() == [3, 5, 6, 7] and comments.max() == 1


def test_finetune_smoke(ray_session, fake_features, tmp_path):
    out = finetune(FinetuneConfig(features=str(fake_features), out=str(tmp_path / "ckpt"), epochs=3, patience=3,
                                  batch_size=32, size=ModelSize(max_history=8),
                                  log_every=1000))
    ckpt = tmp_path / "ckpt"
    assert out == str(ckpt)
    info = json.loads((ckpt / "train.json").read_text())
    history = info["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["video_loss"] < history[0]["video_loss"]
    # 160 comment examples, 5 steps an epoch: the comment loss starts low (history_match) and is noisy from
    # epoch to epoch, so the check is that training lowered it at some point.
    assert min(h["comment_loss"] for h in history[1:]) < history[0]["comment_loss"]
    assert history[0]["examples"] == 400 + 160
    assert info["best_epoch"] in (1, 2, 3)

    kind, model = load_model(ckpt)
    assert kind == "sr" and model.config.num_videos == 48 and model.config.use_id_embedding
    assert model.video_seen.all()  # every fake video appears in the train examples

    # Offline evaluation through Scorer reproduces the valid metrics measured inside training.
    valid = evaluate(fake_features, {"sr_no_align": ckpt}, split="valid", popularity=False)
    for task in TASKS:
        for name in METRIC_NAMES:
            assert valid[task]["sr_no_align"][name] == pytest.approx(info["valid"][task][name], abs=1e-9)

    # Two loads of the checkpoint give identical scores.
    scorer, again = Scorer(ckpt, fake_features), Scorer(ckpt, fake_features)
    users = {k: [[1, 2, 3]] if k in ("hist_video", "hist_video_hot", "hist_video_ts") else [[]]
             for k in ("hist_video", "hist_video_hot", "hist_video_ts", "hist_cmt_video", "hist_cmt_comments",
                       "hist_cmt_ts")}
    hist = scorer.histories(users)
    assert torch.equal(scorer.video_scores(hist), again.video_scores(hist))
    query, cands = torch.tensor([2]), torch.tensor([[8, 9, 10, 11]])
    assert torch.equal(scorer.comment_scores(hist, query, cands), again.comment_scores(hist, query, cands))


def test_finetune_and_evaluate_from_a_features_uri(ray_session, fake_features, tmp_path, monkeypatch):
    """local:// is fsspec's local file system reached through a URI: the same path as s3:// (a local copy on
    the driver and per node, train files read by Ray Data through the URI's file system), readable from every
    Ray worker process."""
    from core import storage

    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"local://{tmp_path}/bucket/features"
    storage.upload_dir(fake_features, uri, "manifest.json")
    ckpt = tmp_path / "ckpt"
    finetune(FinetuneConfig(features=uri, out=str(ckpt), epochs=1, patience=1, batch_size=32, size=ModelSize(max_history=8),
                            log_every=1000, num_workers=1))
    info = json.loads((ckpt / "train.json").read_text())
    assert info["history"][0]["examples"] == 400 + 160  # every train example, read through the URI
    (copy,) = (tmp_path / "cache" / "features").iterdir()
    assert storage.list_files(str(copy)) == storage.list_files(str(fake_features))
    valid = evaluate(uri, {"m": ckpt}, split="valid", popularity=False)
    same = evaluate(fake_features, {"m": ckpt}, split="valid", popularity=False)
    for task in TASKS:
        for name in METRIC_NAMES:
            assert valid[task]["m"][name] == pytest.approx(info["valid"][task][name], abs=1e-9)
            assert valid[task]["m"][name] == same[task]["m"][name]
