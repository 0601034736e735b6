"""Ray Serve application: FastAPI ingress in front of the SR model.

The deployment loads everything in `__init__` (checkpoint, item matrices, titles, user histories) and answers
with the same `trainers.scoring.Scorer` that offline evaluation uses, so online and offline scores agree.
"""


import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

MAX_K = 100
HISTORY_COLUMNS = ("hist_video", "hist_video_hot", "hist_video_ts", "hist_cmt_video", "hist_cmt_comments", "hist_cmt_ts")


class VideoRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class CommentRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    video_id: str = Field(min_length=1, max_length=256)
    k: int = Field(10, ge=1, le=MAX_K)


class ScoredItem(BaseModel):
    id: str
    text: str = Field(description="video title, or comment text")
    score: float


class Recommendations(BaseModel):
    user_id: str
    model_version: str
    cold_start: bool = Field(description="true when the user is unknown and the answer is popular items")
    items: list[ScoredItem]


app = FastAPI(
    title="LSVCR-stream recommender",
    description="Top-k videos and comments from the LSVCR sequential recommender.",
    version="1",
)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class Recommender:
    def __init__(self, features: str, checkpoint: str):
        from trainers.scoring import Scorer

        features_dir = Path(features)
        self.scorer = Scorer(checkpoint, features)
        self.version = Path(checkpoint).name
        self.loaded_at = time.time()
        videos = pq.read_table(features_dir / "videos.parquet", columns=["video_id", "title"])
        self.video_ids = np.asarray(videos["video_id"].to_pylist(), dtype=object)
        self.video_titles = videos["title"].to_pylist()
        self.video_index = {vid: i for i, vid in enumerate(self.video_ids)}
        comments = pq.read_table(features_dir / "comments.parquet", columns=["comment_id", "video_idx", "text"])
        self.comment_ids = comments["comment_id"].to_pylist()
        self.comment_texts = comments["text"].to_pylist()
        comment_video = comments["video_idx"].to_numpy()
        order = np.argsort(comment_video, kind="stable")
        starts = np.searchsorted(comment_video[order], np.arange(len(self.video_ids) + 1))
        self.comments_of_video = [order[starts[v]:starts[v + 1]] for v in range(len(self.video_ids))]
        self.users = pq.read_table(features_dir / "users.parquet")
        self.user_row = {uid: i for i, uid in enumerate(self.users["user_id"].to_pylist())}
        # Cold start: the videos users engaged with most, an answer that needs no history.
        counts = np.bincount(np.concatenate([np.asarray(h, dtype=np.int64) for h in self.users["hist_video"].to_pylist()] or [np.zeros(0, np.int64)]),
                             minlength=len(self.video_ids))
        self.popular = np.argsort(-counts, kind="stable")
        self.popular_counts = counts

    def _history(self, user_id: str) -> dict | None:
        """The user's history columns as a batch of one, or None for an unknown user."""
        row = self.user_row.get(user_id)
        if row is None:
            return None
        return {col: [self.users[col][row].as_py()] for col in HISTORY_COLUMNS}

    @app.get("/v1/health")
    def health(self) -> dict:
        return {"status": "ok", "model_version": self.version}

    @app.get("/v1/model")
    def model(self) -> dict:
        return {
            "model_version": self.version,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "videos": len(self.video_ids),
            "comments": len(self.comment_ids),
            "users": len(self.user_row),
        }

    @app.post("/v1/recommend/videos", response_model=Recommendations)
    def recommend_videos(self, req: VideoRequest) -> Recommendations:
        history = self._history(req.user_id)
        if history is None:
            top = self.popular[: req.k]
            items = [ScoredItem(id=self.video_ids[i], text=self.video_titles[i], score=float(self.popular_counts[i])) for i in top]
            return Recommendations(user_id=req.user_id, model_version=self.version, cold_start=True, items=items)
        scores = self.scorer.video_scores(self.scorer.histories(history))[0].numpy()  # [V]
        if req.exclude_seen:
            scores[np.asarray(history["hist_video"][0], dtype=np.int64)] = -np.inf
        k = min(req.k, int(np.isfinite(scores).sum()))
        top = np.argsort(-scores, kind="stable")[:k]
        items = [ScoredItem(id=self.video_ids[i], text=self.video_titles[i], score=float(scores[i])) for i in top]
        return Recommendations(user_id=req.user_id, model_version=self.version, cold_start=False, items=items)

    @app.post("/v1/recommend/comments", response_model=Recommendations)
    def recommend_comments(self, req: CommentRequest) -> Recommendations:
        video = self.video_index.get(req.video_id)
        if video is None:
            raise HTTPException(status_code=404, detail=f"unknown video_id {req.video_id!r}")
        candidates = self.comments_of_video[video]
        if len(candidates) == 0:
            return Recommendations(user_id=req.user_id, model_version=self.version, cold_start=False, items=[])
        history = self._history(req.user_id)
        cold = history is None
        if cold:  # no history: the current video alone is the context
            history = {col: [[]] for col in HISTORY_COLUMNS}
        scores = self.scorer.comment_scores(
            self.scorer.histories(history), torch.tensor([video]), torch.as_tensor(candidates[None, :])
        )[0].numpy()  # [N]
        top = np.argsort(-scores, kind="stable")[: req.k]
        items = [ScoredItem(id=self.comment_ids[candidates[i]], text=self.comment_texts[candidates[i]], score=float(scores[i])) for i in top]
        return Recommendations(user_id=req.user_id, model_version=self.version, cold_start=cold, items=items)


APP_NAME = "lsvcr"


def start(features: str, checkpoint: str, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> str:
    """Deploy the app on a local (or RAY_ADDRESS) Ray and return its base URL."""
    from ray.serve.schema import LoggingConfig

    from lsvcr.ray_runtime import init_ray

    init_ray()
    logging_config = None if access_log else LoggingConfig(log_level="WARNING", enable_access_log=False)
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(Recommender.bind(features, checkpoint), name=APP_NAME, route_prefix="/", logging_config=logging_config)
    return f"http://{host}:{port}"


def stop() -> None:
    serve.shutdown()


def serve_forever(features: str, checkpoint: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    url = start(features, checkpoint, host, port)
    print(f"[serve] {url}  (API docs {url}/docs, Ray dashboard http://127.0.0.1:8265)  Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()


def show_samples(url: str, features: str, n_users: int = 2, k: int = 5) -> None:
    """Print, by title, what the service recommends to the users with the longest histories."""
    import httpx

    users = pq.read_table(Path(features) / "users.parquet", columns=["user_id", "hist_video"])
    titles = pq.read_table(Path(features) / "videos.parquet", columns=["title"])["title"].to_pylist()
    histories = users["hist_video"].to_pylist()
    longest = np.argsort([-len(h) for h in histories], kind="stable")[:n_users]
    with httpx.Client(base_url=url, timeout=30) as client:
        for row in longest:
            user_id = users["user_id"][int(row)].as_py()
            print(f"\nuser {user_id}: last watched")
            for v in histories[row][-3:]:
                print(f"    - {titles[v]}")
            videos = client.post("/v1/recommend/videos", json={"user_id": user_id, "k": k})
            videos.raise_for_status()
            print("  recommended videos:")
            for item in videos.json()["items"]:
                print(f"    {item['score']:7.3f}  {item['text']}")
            top = videos.json()["items"][0]
            comments = client.post("/v1/recommend/comments", json={"user_id": user_id, "video_id": top["id"], "k": 3})
            comments.raise_for_status()
            print(f'  comments to show this user under "{top["text"]}":')
            for item in comments.json()["items"]:
                print(f"    {item['score']:7.3f}  {item['text']}")
