"""The serve benchmark's baseline: one uvicorn process scoring each request with the same ModelState code.

    python -m benchmarks.minimal_server CHECKPOINT FEATURES PORT
"""

import sys

import uvicorn
from fastapi import FastAPI

from serving.app import Recommendations, VideoRequest, top_videos
from serving.state import load_state


def make_app(checkpoint: str, features: str) -> FastAPI:
    state = load_state("baseline", checkpoint, features)
    app = FastAPI()

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/recommend/videos")
    def recommend(req: VideoRequest) -> Recommendations:
        history = state.history(req.user_id)
        scores = state.scorer.video_scores(state.scorer.histories(history or state.empty_history()))  # [1, V]
        items = top_videos(state, scores, [history], [req.k], [req.exclude_seen])[0]
        return Recommendations(user_id=req.user_id, model_version=state.version, cold_start=history is None, items=items)

    return app


if __name__ == "__main__":
    checkpoint, features, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    uvicorn.run(make_app(checkpoint, features), host="127.0.0.1", port=port, log_level="warning")
