"""A small fake features folder in the exact layout of docs/DATA.md section 3.

Items and users have a topic, so there is something to learn: a video's and a comment's text embedding lie
near their topic's centre; a user mostly watches videos of their topic and engages with the comment of their
topic under whatever video they watch (each video has one comment per topic).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core import contract

TOPICS, COMMENTS_PER_VIDEO = 4, 4


def write_examples(root: Path, task: str, split: str, rows: list[dict]) -> None:
    """Example rows in the production schema; a video row's `negatives` also fill every protocol's column."""
    folder = contract.examples_dir(root, task, split)
    folder.mkdir(parents=True, exist_ok=True)
    if task == "video":
        rows = [{**{name: row["negatives"] for name in contract.PROTOCOL_COLUMNS}, **row} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=contract.EXAMPLE_SCHEMA[task]), folder / "part-0.parquet")


def write_embeddings(root: Path, video_emb: np.ndarray, comment_emb: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / contract.VIDEO_EMB, video_emb.astype(np.float32))
    np.save(root / contract.COMMENT_EMB, comment_emb.astype(np.float32))


def snapshot(hist: dict[str, list], max_history: int) -> dict[str, list]:
    """The last max_history elements of each history (3 flattened comments per comment record)."""
    snap = {name: list(values[-max_history:]) for name, values in hist.items()}
    records = len(snap["hist_cmt_video"])
    per = contract.COMMENTS_PER_RECORD
    snap["hist_cmt_comments"] = list(hist["hist_cmt_comments"][len(hist["hist_cmt_comments"]) - per * records:])
    return snap


def make_features(root: Path, num_users: int = 40, num_videos: int = 48, video_events: int = 12,
                  comment_events: int = 6, dim: int = 32, max_history: int = 8, num_negatives: int = 10,
                  seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(TOPICS, dim))

    def embed(topics):
        x = centres[topics] + 0.6 * rng.normal(size=(len(topics), dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    video_topic = np.arange(num_videos) % TOPICS
    num_comments = num_videos * COMMENTS_PER_VIDEO
    comment_video = np.arange(num_comments) // COMMENTS_PER_VIDEO
    comment_topic = np.arange(num_comments) % TOPICS  # one comment per topic under every video
    write_embeddings(root, embed(video_topic), embed(comment_topic))
    pq.write_table(pa.table({
        "video_idx": pa.array(range(num_videos), pa.int32()),
        "video_id": [f"v{i}" for i in range(num_videos)], "title": [f"title {i}" for i in range(num_videos)],
        "tags": pa.array([[] for _ in range(num_videos)], pa.list_(pa.string())),
        "author_id": ["a"] * num_videos, "ts": pa.array(range(num_videos), pa.int64()),
        "text": [f"title {i}" for i in range(num_videos)]}), root / contract.VIDEOS)
    pq.write_table(pa.table({
        "comment_idx": pa.array(range(num_comments), pa.int32()),
        "comment_id": [f"c{i}" for i in range(num_comments)],
        "video_id": [f"v{v}" for v in comment_video], "video_idx": pa.array(comment_video, pa.int32()),
        "author_id": ["a"] * num_comments, "text": [f"comment {i}" for i in range(num_comments)],
        "parent_id": pa.array([None] * num_comments, pa.string()),
        "ts": pa.array(range(num_comments), pa.int64())}), root / contract.COMMENTS)

    examples = {(t, s): [] for t in contract.TASKS for s in contract.SPLITS}
    users = []
    for u in range(num_users):
        topic = u % TOPICS
        own = np.flatnonzero(video_topic == topic)
        hist = {name: [] for name in contract.HISTORY_COLUMNS}
        # Interleave the user's video and comment events in time; the last two of each task are valid, test.
        kinds = ["video"] * video_events + ["comment"] * comment_events
        rng.shuffle(kinds)
        done = {"video": 0, "comment": 0}
        for k, kind in enumerate(kinds):
            ts = 1_000_000 + 1000 * k + u
            left = (video_events if kind == "video" else comment_events) - done[kind]
            split = "test" if left == 1 else "valid" if left == 2 else "train"
            done[kind] += 1
            row = {"user_id": f"u{u}", "event_id": f"e{u}-{k}", "ts": ts, **snapshot(hist, max_history)}
            if kind == "video":
                target = int(rng.choice(own)) if rng.random() < 0.85 else int(rng.integers(num_videos))
                others = np.setdiff1d(np.arange(num_videos), [target])
                row.update(target=target, negatives=rng.choice(others, num_negatives, replace=False).tolist())
                hot = -1 if rng.random() < 0.2 else target * COMMENTS_PER_VIDEO + int(rng.integers(TOPICS))
                hist["hist_video"].append(target)
                hist["hist_video_hot"].append(hot)
                hist["hist_video_ts"].append(ts)
            else:
                query = int(rng.integers(num_videos))
                target = query * COMMENTS_PER_VIDEO + topic
                negatives = [query * COMMENTS_PER_VIDEO + t for t in range(TOPICS) if t != topic]
                if k % 7 == 0:
                    negatives = []  # no other comment existed yet
                likes = rng.integers(0, 5, size=len(negatives) + 1)
                row.update(query_video=query, target=target, negatives=negatives, target_likes=int(likes[0]),
                           negative_likes=likes[1:].tolist())
                liked = [target, -1, -1] if rng.random() < 0.5 else [target, negatives[0] if negatives else -1, -1]
                hist["hist_cmt_video"].append(query)
                hist["hist_cmt_comments"].extend(liked)
                hist["hist_cmt_ts"].append(ts)
            examples[(kind, split)].append(row)
        users.append({"user_id": f"u{u}", **snapshot(hist, max_history)})
    for (task, split), rows in examples.items():
        write_examples(root, task, split, rows)
    pq.write_table(pa.Table.from_pylist(users, schema=contract.USERS_SCHEMA), root / contract.USERS)
    manifest = {"counts": {f"{t}/{s}": len(r) for (t, s), r in examples.items()}, "max_history": max_history,
                "num_negatives": num_negatives, "embedding_dim": dim, "encoder": "fake", "schema_version": 1}
    (root / contract.MANIFEST).write_text(json.dumps(manifest))
    return root


def make_history_batch(empty: bool = False) -> dict[str, torch.Tensor]:
    if empty:
        return {"hist_video": torch.full((2, 1), -1), "hist_video_hot": torch.full((2, 1), -1),
                "hist_video_mask": torch.zeros(2, 1, dtype=torch.bool), "hist_cmt_video": torch.full((2, 1), -1),
                "hist_cmt_comments": torch.full((2, 1, 3), -1), "hist_cmt_mask": torch.zeros(2, 1, dtype=torch.bool)}
    return {
        "hist_video": torch.tensor([[1, 2, 3, 4], [-1, -1, 5, 6]]),
        "hist_video_hot": torch.tensor([[0, -1, 5, 6], [-1, -1, -1, 9]]),
        "hist_video_mask": torch.tensor([[True] * 4, [False, False, True, True]]),
        "hist_cmt_video": torch.tensor([[7, 8], [-1, -1]]),
        "hist_cmt_comments": torch.tensor([[[1, 2, -1], [3, -1, -1]], [[-1, -1, -1], [-1, -1, -1]]]),
        "hist_cmt_mask": torch.tensor([[True, True], [False, False]]),
    }


@pytest.fixture
def history_batch():
    """Index tensors of two users (row 1 with no comment history); empty=True: two users without history."""
    return make_history_batch


@pytest.fixture(scope="session")
def fake_features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


@pytest.fixture
def features_writer():
    """(write_examples, write_embeddings) for hand-made features folders."""
    return write_examples, write_embeddings
