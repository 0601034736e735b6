"""What one model version serves with: the scorer, the item catalog and the users' histories.

Built whole before it replaces the previous one, so a request sees one consistent version from start to end.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np

from core.contract import HISTORY_COLUMNS
from features.folder import FeaturesFolder
from serving.histories import latest_hot_comments
from trainers.scoring import Scorer


@dataclasses.dataclass
class ModelState:
    version: str
    loaded_at: float
    scorer: Scorer
    video_ids: list[str]
    video_titles: list[str]
    video_index: dict[str, int]
    comment_ids: list[str]
    comment_texts: list[str]
    comment_index: dict[str, int]
    hot_of_video: np.ndarray  # video_idx -> latest known hot comment_idx (-1 none), for fresh histories
    comments_of_video: list[np.ndarray]  # video_idx -> comment_idx under it
    users: dict[str, dict]  # user_id -> history columns (lists)
    popular: np.ndarray  # video_idx by engagement, most first: the cold-start answer
    popular_counts: np.ndarray
    encoder: str = "minilm"  # the text encoder of the features folder, for items that arrive later
    encoder_dim: int = 64

    def history(self, user_id: str) -> dict | None:
        """The user's history columns as a batch of one, or None for an unknown user."""
        row = self.users.get(user_id)
        return None if row is None else {col: [row[col]] for col in HISTORY_COLUMNS}

    @staticmethod
    def empty_history() -> dict:
        return {col: [[]] for col in HISTORY_COLUMNS}


def load_state(version: str, checkpoint: str | Path, features: str | Path) -> ModelState:
    """Load a checkpoint with its features folder. Raises CheckpointError (or OSError) if either is unusable."""
    folder = FeaturesFolder.open(features)
    scorer = Scorer(checkpoint, folder)
    videos = folder.videos(["video_id", "title"])
    video_ids = videos["video_id"].to_pylist()
    comments = folder.comments(["comment_id", "video_idx", "text"])
    comment_video = comments["video_idx"].to_numpy()
    order = np.argsort(comment_video, kind="stable")
    bounds = np.searchsorted(comment_video[order], np.arange(len(video_ids) + 1))
    users = folder.users().to_pylist()
    comment_ids = comments["comment_id"].to_pylist()
    engaged = [np.asarray(u["hist_video"], dtype=np.int64) for u in users]
    counts = np.bincount(np.concatenate(engaged) if engaged else np.zeros(0, np.int64), minlength=len(video_ids))
    built_with = folder.manifest.get("config", {})
    return ModelState(
        encoder=built_with.get("encoder", "minilm"),
        encoder_dim=int(built_with.get("encoder_dim", 64)),
        version=version,
        loaded_at=time.time(),
        scorer=scorer,
        video_ids=video_ids,
        video_titles=videos["title"].to_pylist(),
        video_index={vid: i for i, vid in enumerate(video_ids)},
        comment_ids=comment_ids,
        comment_texts=comments["text"].to_pylist(),
        comment_index={cid: i for i, cid in enumerate(comment_ids)},
        hot_of_video=latest_hot_comments([u["hist_video"] for u in users], [u["hist_video_hot"] for u in users],
                                         [u["hist_video_ts"] for u in users], len(video_ids)),
        comments_of_video=[order[bounds[v]:bounds[v + 1]] for v in range(len(video_ids))],
        users={u["user_id"]: u for u in users},
        popular=np.argsort(-counts, kind="stable"),
        popular_counts=counts,
    )
