"""Ray Serve application: FastAPI ingress in front of the SR model.

The deployment follows a model registry (trainers/registry.py): a watcher thread notices a new CURRENT
version, loads it completely beside the old one and swaps one reference, so requests in flight finish on
the model they started with. A version that fails to load is refused with a logged reason and the old one
keeps serving. Scores come from `trainers.scoring.Scorer`, the code offline evaluation uses.
"""

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from core.runtime import init_ray
from features.embeddings import make_encoder
from features.folder import FeaturesFolder
from ingestion.sequence_store import SequenceStore
from serving.catalog import CatalogFollower, extend_state
from serving.histories import history_from_store
from serving.state import ModelState, load_state
from trainers.registry import Registry

log = logging.getLogger("ray.serve")

MAX_K = 100
MAX_BODY_BYTES = 16 * 1024


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1, max_length=256)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class CommentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
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
    cold_start: bool = Field(description="true when the user is unknown: popular videos, or comments ranked by the video alone")
    items: list[ScoredItem]


app = FastAPI(
    title="LSVCR-stream recommender",
    description="Top-k videos and comments from the LSVCR sequential recommender.",
    version="1",
)


class BodySizeLimit:
    """413 for bodies over MAX_BODY_BYTES by their Content-Length, before anything reads them. A plain ASGI
    middleware: Starlette's @app.middleware("http") adds a task and a stream to every request."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                refusal = JSONResponse(status_code=413, content={"detail": f"request body over {MAX_BODY_BYTES} bytes"})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


app.add_middleware(BodySizeLimit)


@app.exception_handler(RequestValidationError)
async def explain_validation_error(request: Request, err: RequestValidationError):
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(status_code=400, content={"detail": "request body is not valid JSON"})
    readable = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors]
    return JSONResponse(status_code=422, content={"detail": readable})


def _merge(histories: list[dict]) -> dict:
    """Batches of one -> one batch, in order."""
    return {col: [row for h in histories for row in h[col]] for col in histories[0]}


def top_videos(state: ModelState, scores: torch.Tensor, histories: list[dict], ks: list[int],
               exclude_seen: list[bool]) -> list[list[ScoredItem]]:
    """Each row's k best-scored videos [B, V] -> items, leaving out the ones in its history when asked: one
    top-k over the whole batch."""
    for row, (history, exclude) in enumerate(zip(histories, exclude_seen)):
        if exclude and history is not None:
            scores[row, torch.as_tensor(history["hist_video"][0], dtype=torch.long)] = -torch.inf
    values, indices = torch.topk(scores, min(max(ks), scores.shape[1]), dim=1)  # [B, K]
    return [[ScoredItem(id=state.video_ids[i], text=state.video_titles[i], score=v)
             for v, i in zip(values[row, :k].tolist(), indices[row, :k].tolist()) if v != -np.inf]
            for row, k in enumerate(ks)]


# Measured by `lsvcr benchmark serve` (max_ongoing sweep at concurrency 32): see BENCHMARKS.md.
MAX_ONGOING_REQUESTS = 64


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class Recommender:
    def __init__(self, registry: str | None = None, checkpoint: str | None = None, features: str | None = None,
                 poll_s: float = 1.0, sequence_store: str | None = None, catalog_bootstrap: str | None = None,
                 topic_prefix: str = ""):
        """Serve the registry's CURRENT version (and follow it), or one fixed checkpoint + features folder.

        With `sequence_store` (the SQLite file the ingest consumer keeps), each request reads the user's
        current histories from it, so an event ingested now changes the next answer; users it does not know
        fall back to the features snapshot (users.parquet). With `catalog_bootstrap`, videos and comments
        published to the catalog topics are embedded on arrival and become recommendable."""
        self.refusals: list[dict] = []
        self._lock = threading.Lock()  # serialises state replacements (new version, new items)
        self.arrived = {"videos": [], "comments": []}
        self._encoders: dict = {}
        self.sequence_store_path = sequence_store
        self._store = None
        self._stop = threading.Event()
        self.registry = None
        if registry:
            self.registry = Registry(registry)
            version = self.registry.current()
            if version is None:
                raise RuntimeError(f"registry {registry} has no CURRENT version: publish one first")
            self.state = self._load_version(version)
            threading.Thread(target=self._watch, args=(poll_s,), daemon=True, name="registry-watch").start()
        elif checkpoint and features:
            self.state = load_state(Path(checkpoint).name, checkpoint, features)
        else:
            raise ValueError("Recommender needs a registry, or a checkpoint and a features folder")
        self.catalog = None
        if catalog_bootstrap:
            self.catalog = CatalogFollower(catalog_bootstrap, topic_prefix, self.add_items)
            self.catalog.start()

    def _with_arrivals(self, state: ModelState) -> ModelState:
        if not self.arrived["videos"] and not self.arrived["comments"]:
            return state
        key = (state.encoder, state.encoder_dim)
        if key not in self._encoders:
            self._encoders[key] = make_encoder(state.encoder, state.encoder_dim)
        return extend_state(state, self.arrived["videos"], self.arrived["comments"], self._encoders[key].encode)

    def add_items(self, videos: list[dict], comments: list[dict]) -> None:
        """New catalog records: keep them (a later model version needs them too) and serve them now."""
        with self._lock:
            self.arrived["videos"] += videos
            self.arrived["comments"] += comments
            self.state = self._with_arrivals(self.state)

    def _load_version(self, version: str) -> ModelState:
        return load_state(version, self.registry.path(version), self.registry.features_path(version))

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self.check_registry()

    def check_registry(self) -> None:
        version = self.registry.current()
        if version is None or version == self.state.version or any(r["version"] == version for r in self.refusals):
            return
        try:
            loaded = self._load_version(version)
            with self._lock:  # items that arrived meanwhile are added before the swap, under the same lock
                self.state = self._with_arrivals(loaded)  # one reference swap: requests in flight keep theirs
        except Exception as err:  # any failure to load keeps the old model serving
            reason = f"{type(err).__name__}: {err}"
            self.refusals.append({"version": version, "reason": reason, "at": time.time()})
            log.error(f"refusing model version {version}, still serving {self.state.version}: {reason}")
            return
        log.warning(f"now serving model version {version}")

    def __del__(self):
        self._stop.set()
        if getattr(self, "catalog", None):
            self.catalog.stopped.set()

    def _history(self, state: ModelState, user_id: str) -> tuple[dict | None, str]:
        """(history batch of one or None, where it came from: store, snapshot or unknown)."""
        store = self._sequence_store()
        if store is not None:
            fresh = history_from_store(store.get_histories(user_id), state.video_index, state.comment_index,
                                       state.hot_of_video, state.scorer.max_history)
            if fresh is not None:
                return fresh, "store"
        history = state.history(user_id)
        return history, "snapshot" if history is not None else "unknown"

    def _sequence_store(self):
        if self._store is None and self.sequence_store_path and Path(self.sequence_store_path).exists():
            self._store = SequenceStore(self.sequence_store_path, readonly=True)
        return self._store

    @app.get("/v1/users/{user_id}/history")
    def user_history(self, user_id: str) -> dict:
        """The histories the next recommendation for this user will use (ids, oldest first)."""
        state = self.state
        history, source = self._history(state, user_id)
        if history is None:
            return {"user_id": user_id, "source": source, "videos": [], "comment_records": []}
        flat = history["hist_cmt_comments"][0]
        return {
            "user_id": user_id,
            "source": source,
            "videos": [state.video_ids[v] for v in history["hist_video"][0]],
            "comment_records": [
                {"video_id": state.video_ids[v], "comment_ids": [state.comment_ids[c] for c in flat[3 * i:3 * i + 3] if c >= 0]}
                for i, v in enumerate(history["hist_cmt_video"][0])
            ],
        }

    @app.get("/v1/health")
    def health(self) -> dict:
        return {"status": "ok", "model_version": self.state.version}

    @app.get("/v1/model")
    def model(self) -> dict:
        state = self.state
        return {
            "model_version": state.version,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.loaded_at)),
            "videos": len(state.video_ids),
            "comments": len(state.comment_ids),
            "users": len(state.users),
            "refused_versions": self.refusals[-5:],
            "items_arrived": {k: len(v) for k, v in self.arrived.items()},
            "catalog_error": self.catalog.error if self.catalog else None,
        }

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _top_videos(self, requests: list[tuple[ModelState, dict, VideoRequest]]) -> list[list[ScoredItem]]:
        """Score a batch of users against the full corpus in one matmul [B, V] and one top-k.

        Tried and dropped: running this in a worker thread so the event loop serves HTTP meanwhile. The two
        fight over the GIL: at concurrency 32 (50k videos, under py-spy) 241 rps against 451 without it."""
        by_state: dict[int, list[int]] = {}
        for i, (state, _, _) in enumerate(requests):
            by_state.setdefault(id(state), []).append(i)
        out: list[list[ScoredItem]] = [None] * len(requests)
        for rows in by_state.values():  # requests straddling a swap are scored by their own version
            state = requests[rows[0]][0]
            histories = [requests[i][1] for i in rows]
            scores = state.scorer.video_scores(state.scorer.histories(_merge(histories)))  # [B, V]
            tops = top_videos(state, scores, histories, [requests[i][2].k for i in rows],
                              [requests[i][2].exclude_seen for i in rows])
            for i, items in zip(rows, tops):
                out[i] = items
        return out

    @app.post("/v1/recommend/videos", response_model=Recommendations)
    async def recommend_videos(self, req: VideoRequest) -> Recommendations:
        state = self.state
        history, _ = self._history(state, req.user_id)
        if history is None:
            items = [ScoredItem(id=state.video_ids[i], text=state.video_titles[i], score=float(state.popular_counts[i]))
                     for i in state.popular[: req.k]]
            return Recommendations(user_id=req.user_id, model_version=state.version, cold_start=True, items=items)
        items = await self._top_videos((state, history, req))
        return Recommendations(user_id=req.user_id, model_version=state.version, cold_start=False, items=items)

    @app.post("/v1/recommend/comments", response_model=Recommendations)
    async def recommend_comments(self, req: CommentRequest) -> Recommendations:
        state = self.state
        video = state.video_index.get(req.video_id)
        if video is None:
            raise HTTPException(status_code=404, detail=f"unknown video_id {req.video_id!r}")
        history, _ = self._history(state, req.user_id)
        cold = history is None
        candidates = state.comments_of_video[video]
        if len(candidates) == 0:
            return Recommendations(user_id=req.user_id, model_version=state.version, cold_start=cold, items=[])
        scores = state.scorer.comment_scores(
            state.scorer.histories(ModelState.empty_history() if cold else history),
            torch.tensor([video]), torch.as_tensor(candidates[None, :]),
        )[0]  # [N]
        top = torch.topk(scores, min(req.k, len(candidates))).indices.numpy()
        items = [ScoredItem(id=state.comment_ids[candidates[i]], text=state.comment_texts[candidates[i]],
                            score=float(scores[i])) for i in top]
        return Recommendations(user_id=req.user_id, model_version=state.version, cold_start=cold, items=items)


APP_NAME = "lsvcr"


def build_app(args: dict):
    """Application builder for `serve deploy` / `serve run serving.app:build_app registry=DIR`."""
    deployment = Recommender
    if args.get("max_ongoing_requests"):
        deployment = Recommender.options(max_ongoing_requests=int(args["max_ongoing_requests"]))
    return deployment.bind(registry=args.get("registry"), checkpoint=args.get("checkpoint"),
                            features=args.get("features"), poll_s=float(args.get("poll_s", 1.0)),
                            sequence_store=args.get("sequence_store"), catalog_bootstrap=args.get("catalog_bootstrap"),
                            topic_prefix=args.get("topic_prefix", ""))


def start(registry: str | None = None, checkpoint: str | None = None, features: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, access_log: bool = True, poll_s: float = 1.0,
          sequence_store: str | None = None, catalog_bootstrap: str | None = None, topic_prefix: str = "",
          max_ongoing_requests: int | None = None) -> str:
    """Deploy the app on a local (or RAY_ADDRESS) Ray and return its base URL."""
    from ray.serve.schema import LoggingConfig

    init_ray()
    logging_config = None if access_log else LoggingConfig(log_level="WARNING", enable_access_log=False)
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(build_app({"registry": registry, "checkpoint": checkpoint, "features": features, "poll_s": poll_s,
                         "sequence_store": sequence_store, "catalog_bootstrap": catalog_bootstrap,
                         "topic_prefix": topic_prefix, "max_ongoing_requests": max_ongoing_requests}),
              name=APP_NAME, route_prefix="/", logging_config=logging_config)
    return f"http://{host}:{port}"


def stop() -> None:
    serve.shutdown()


def replica_urls(app_name: str = APP_NAME, timeout_s: float = 60.0) -> list[str]:
    """The base URLs at which the app's replicas answer HTTP themselves (Serve's direct ingress, on when
    lsvcr starts Ray: core/runtime.py): the short path, without the proxy. [] when direct ingress is off.

    A replica binds the app's HTTP host; Serve reports each target by its node's address, which is the one to
    use when that host is all interfaces. Waits up to timeout_s for Serve to report a just-deployed app's ports."""
    from ray.serve.context import _get_global_client  # Serve's own details (the dashboard's /api/serve)

    client = _get_global_client()
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.get_serve_details()
        http = details.get("http_options") or {}
        host, proxy_port = http.get("host") or "127.0.0.1", http.get("port")
        urls = [f"http://{target['ip'] if host in ('0.0.0.0', '::') else host}:{target['port']}"
                for group in details.get("target_groups", [])
                if group.get("app_name") == app_name and str(group.get("protocol")).endswith("HTTP")
                for target in group["targets"] if target["port"] != proxy_port]
        if urls or time.monotonic() > deadline or os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            return urls
        time.sleep(0.5)


def serve_forever(registry: str | None = None, checkpoint: str | None = None, features: str | None = None,
                  host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    url = start(registry, checkpoint, features, host, port, **options)
    source = f"registry {registry}" if registry else f"checkpoint {checkpoint}"
    print(f"[serve] {url} serving {source}\n[serve] API docs {url}/docs, Ray dashboard http://127.0.0.1:8265;"
          " Ctrl-C stops", flush=True)
    for direct in replica_urls():
        print(f"[serve] replica {direct} answers the same API without the proxy hop (direct ingress)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()


def show_samples(url: str, folder: FeaturesFolder, n_users: int = 2, k: int = 5) -> None:
    """Print, by title, what the service recommends to the users with the longest histories."""
    import httpx

    users = folder.users(["user_id", "hist_video"])
    titles = folder.videos(["title"])["title"].to_pylist()
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
