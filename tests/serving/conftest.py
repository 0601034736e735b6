"""A small features folder (100 generated users, hash text encoder) and untrained checkpoints for it.

Serving only needs a checkpoint that loads and a features folder that fits it, so checkpoints here are
randomly initialised models saved with the real checkpoint code: fast, and each seed gives other scores.
"""

import json

import numpy as np
import pytest
import torch

from devtools.generator import GeneratorConfig, generate
from ingestion.eventlog import EventLog
from ingestion.schema import TABLES, parse


@pytest.fixture(scope="session")
def serving_features(tmp_path_factory, ray_session):
    from features.build import build_features
    from features.config import FeaturesConfig

    root = tmp_path_factory.mktemp("serving")
    generate(str(root / "data"), GeneratorConfig(users=100, seed=3))
    log = EventLog(root / "eventlog")
    for table in TABLES:
        with open(root / "data" / f"{table}.jsonl", "rb") as f:
            log.append(table, [parse(table, line) for line in f if line.strip()])
    build_features(FeaturesConfig(eventlog=str(root / "eventlog"), out=str(root / "features"), encoder="hash"))
    return root / "features"


def make_checkpoint(features, out, seed: int, text_dim: int | None = None):
    """Save a randomly initialised SR model that fits `features` (or not, with another text_dim)."""
    from trainers.checkpoint import save_checkpoint
    from trainers.models import build_model

    manifest = json.loads((features / "manifest.json").read_text())
    videos = np.load(features / "video_emb.npy", mmap_mode="r")
    comments = np.load(features / "comment_emb.npy", mmap_mode="r")
    config = {"num_videos": videos.shape[0], "num_comments": comments.shape[0],
              "text_dim": text_dim or videos.shape[1], "size": {"max_history": manifest.get("max_history", 50)}}
    torch.manual_seed(seed)
    model = build_model("sr", config)
    return save_checkpoint(out, "sr", model.config, model.state_dict(), {"valid": {"seed": seed}})
