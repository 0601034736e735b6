"""New items while serving: videos and comments from the catalog topics are embedded on arrival.

`extend_state` is the pure part (a new ModelState with the items appended and the item matrices
recomputed); `CatalogFollower` is the Kafka edge, a thread that hands each polled batch to a callback.
New items have no trained ID embedding (their index is past the ID table), so they score by text alone.
"""

import copy
import dataclasses
import threading

import numpy as np
import torch

from features.catalog import video_text
from ingestion.schema import InvalidRecord, parse
from ingestion.topics import topic_names
from serving.state import ModelState


def extend_state(state: ModelState, videos: list[dict], comments: list[dict], encode) -> ModelState:
    """`state` plus the videos and comments it does not know (clean catalog records); `encode(texts)` -> [N, D]."""
    videos = [v for v in _unique(videos, "video_id") if v["video_id"] not in state.video_index]
    video_index = dict(state.video_index)
    for i, v in enumerate(videos):
        video_index[v["video_id"]] = len(state.video_ids) + i
    # A comment whose video is unknown even now waits for a later batch (the catalog may arrive out of order).
    comments = [c for c in _unique(comments, "comment_id")
                if c["comment_id"] not in state.comment_index and c["video_id"] in video_index]
    if not videos and not comments:
        return state
    model = state.scorer.model
    video_text_table, comment_text_table = model.video_text, model.comment_text
    if videos:
        new = encode([video_text(v["title"], v.get("tags")) for v in videos])  # [N, D]
        video_text_table = torch.cat([video_text_table, torch.as_tensor(new, dtype=torch.float32)])
    if comments:
        new = encode([c["text"] for c in comments])  # [M, D]
        comment_text_table = torch.cat([comment_text_table, torch.as_tensor(new, dtype=torch.float32)])
    scorer = copy.copy(state.scorer)  # requests in flight keep the old scorer's item matrices
    scorer.set_text_tables(video_text_table, comment_text_table)

    comment_ids = state.comment_ids + [c["comment_id"] for c in comments]
    comment_index = dict(state.comment_index)
    comments_of_video = state.comments_of_video + [np.zeros(0, dtype=np.int64) for _ in videos]
    for j, c in enumerate(comments):
        idx = len(state.comment_ids) + j
        comment_index[c["comment_id"]] = idx
        v = video_index[c["video_id"]]
        comments_of_video[v] = np.append(comments_of_video[v], idx)
    n_new = len(videos)
    return dataclasses.replace(
        state,
        scorer=scorer,
        video_ids=state.video_ids + [v["video_id"] for v in videos],
        video_titles=state.video_titles + [v["title"] for v in videos],
        video_index=video_index,
        comment_ids=comment_ids,
        comment_texts=state.comment_texts + [c["text"] for c in comments],
        comment_index=comment_index,
        comments_of_video=comments_of_video,
        hot_of_video=np.concatenate([state.hot_of_video, np.full(n_new, -1, dtype=state.hot_of_video.dtype)]),
        # Cold start shows popular videos first, then the newest arrivals.
        popular=np.concatenate([state.popular, np.arange(len(state.video_ids) + n_new - 1, len(state.video_ids) - 1, -1)]),
        popular_counts=np.concatenate([state.popular_counts, np.zeros(n_new, dtype=state.popular_counts.dtype)]),
    )


def _unique(records: list[dict], key: str) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if r[key] not in seen:
            seen.add(r[key])
            out.append(r)
    return out


class CatalogFollower(threading.Thread):
    """Reads the catalog topics from the beginning (no consumer group: every replica needs every item) and
    calls `on_batch(videos, comments)` with each poll's valid records."""

    def __init__(self, bootstrap: str, topic_prefix: str, on_batch, poll_ms: int = 200):
        super().__init__(daemon=True, name="catalog-follower")

        names = topic_names(topic_prefix)
        self.topics = {names["videos"]: "videos", names["comments"]: "comments"}
        self.bootstrap, self.on_batch, self.poll_ms = bootstrap, on_batch, poll_ms
        self.stopped = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        try:
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                     client_id="lsvcr-serve-catalog")
            partitions = [TopicPartition(t, p) for t in self.topics for p in sorted(consumer.partitions_for_topic(t) or ())]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            while not self.stopped.is_set():
                batch = {"videos": [], "comments": []}
                for tp, records in consumer.poll(timeout_ms=self.poll_ms).items():
                    table = self.topics[tp.topic]
                    for record in records:
                        try:
                            batch[table].append(parse(table, record.value or b""))
                        except InvalidRecord:
                            pass  # the ingest consumer dead-letters it; serving just skips it
                if batch["videos"] or batch["comments"]:
                    self.on_batch(batch["videos"], batch["comments"])
            consumer.close()
        except Exception as err:  # keep serving without new items, and say why on /v1/model
            self.error = f"{type(err).__name__}: {err}"
