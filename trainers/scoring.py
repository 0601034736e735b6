"""Scores from a checkpoint: the one code path shared by offline evaluation and online serving.

    scorer = Scorer("CKPT", FeaturesFolder.open("FEATURES"))
    hist = scorer.histories(rows)                     # users.parquet / example rows -> tensors
    scorer.video_scores(hist)                         # [B, V] over the whole video corpus
    scorer.comment_scores(hist, query_video, cands)   # [B, N] for given comment indices (-1 = padding)

Item vectors are precomputed once (`refresh_items`), so every caller ranks against the same matrices.

Time features (trainers/models/sr.py): the request time is `ts` in the history batch: an example's event
time offline, or, for rows without one (users.parquet, the sequence store), the clock when `histories` is
called, so serving measures ages at request time. A model's item vector is then normalize(item) +
age[bucket(ts - published)], and with the freshness heads a user-independent score is added
(trainers/models/item_time.py). Candidate scores are user . matrix[i] / T + (user @ age_table.T / T)[bucket]
+ freshness: the matrix stays precomputed and each request adds one gathered [B, num_buckets] term and the
freshness score per item. Full-corpus scores use the matrix with the age terms added, rebuilt only when some
video changes bucket, plus the freshness of every video at the request time.

`age_terms=False` scores without the item-age parts (the age table and the freshness score; the history gap
embeddings stay): how much of a model's ranking comes from item age (BENCHMARKS.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from features.folder import FeaturesFolder
from trainers.checkpoint import CheckpointError, load_model
from trainers.data import collate_histories, item_time_tensors, text_tensors
from trainers.models.base import Recommender, TextRecommender, has_time_features
from trainers.models.layers import time_bucket_edges


class Scorer:
    def __init__(self, ckpt_dir: str | Path, features: FeaturesFolder | str | Path, device: str = "cpu",
                 age_terms: bool = True):
        """Load the checkpoint (CheckpointError if it is missing, corrupt or incompatible) and the
        features folder's text embeddings, and precompute the item matrices."""
        self.kind, model = load_model(ckpt_dir)
        folder = FeaturesFolder.open(features)
        try:
            self._setup(model, folder, torch.device(device), age_terms)
        except ValueError as err:  # e.g. the text embeddings' dimension differs from the model's
            raise CheckpointError(f"{ckpt_dir} does not fit the features in {folder}: {err}") from None

    @classmethod
    def from_model(cls, kind: str, model: Recommender, folder: FeaturesFolder) -> "Scorer":
        """Wrap a model in memory (used for validation during training). Puts the model in eval mode;
        the caller switches it back to train mode."""
        scorer = cls.__new__(cls)
        scorer.kind = kind
        scorer._setup(model, folder, next(model.parameters()).device)
        return scorer

    def _setup(self, model: Recommender, folder: FeaturesFolder, device: torch.device, age_terms: bool = True) -> None:
        self.device = device
        self.age_terms = age_terms
        self.model = model.to(device).eval()
        self.max_history = model.config.size.max_history
        self.temperature = model.temperature
        self.time_features = has_time_features(model)
        self.video_pub_ts = self.comment_pub_ts = None
        times = item_time_tensors(folder) if self.time_features else (None, None)
        self.set_text_tables(*text_tensors(folder), *times)

    def set_text_tables(self, video_text: torch.Tensor, comment_text: torch.Tensor,
                        video_ts: torch.Tensor | None = None, comment_ts: torch.Tensor | None = None) -> None:
        """Attach (possibly grown) text matrices [V, D], [C, D] and recompute the item matrices.

        video_ts [V] / comment_ts [C] are the publication times (ms). Left out when the tables grew by
        items that just arrived (serving/catalog.py): known items keep theirs and the new ones are taken as
        published now. A model without text (SASRec) takes only the new item counts."""
        if isinstance(self.model, TextRecommender):
            self.model.set_text_tables(video_text, comment_text)
        self.num_videos, self.num_comments = video_text.shape[0], comment_text.shape[0]
        if self.time_features:
            now = int(time.time() * 1000)
            self.video_pub_ts = _grown_times(video_ts, self.video_pub_ts, self.num_videos, now, "video")
            self.comment_pub_ts = _grown_times(comment_ts, self.comment_pub_ts, self.num_comments, now, "comment")
            self.model.set_item_times(self.video_pub_ts, self.comment_pub_ts)
        self.refresh_items()

    @torch.no_grad()
    def refresh_items(self, chunk: int = 65536) -> None:
        def matrix(fn, n):
            parts = [fn(torch.arange(i, min(i + chunk, n), device=self.device)) for i in range(0, n, chunk)]
            return torch.cat(parts) if parts else torch.zeros(0, self.model.config.size.hidden, device=self.device)

        if self.time_features:  # without the age term, which depends on the request time
            video, comment = (lambda idx: self.model.timeless_item_vectors("video", idx),
                              lambda idx: self.model.timeless_item_vectors("comment", idx))
        else:
            video, comment = self.model.video_item_vectors, self.model.comment_item_vectors
        self.video_matrix = matrix(video, self.num_videos)  # [V, H]
        self._aged = None  # (from ts, until ts, video_matrix with the age terms at from ts)
        self.comment_matrix = matrix(comment, self.num_comments)  # [C, H]

    def histories(self, rows: dict, now_ms: int | None = None) -> dict[str, torch.Tensor]:
        """History columns (dict of lists or numpy arrays) -> the tensors the other methods take. The
        request time ts [B] is the rows' `ts` column when they have one, else now_ms, else the clock."""
        hist = collate_histories(rows, self.max_history)
        if "ts" not in hist:
            now = int(time.time() * 1000) if now_ms is None else int(now_ms)
            hist["ts"] = torch.full((hist["hist_video"].shape[0],), now, dtype=torch.long)
        return hist

    def _to_device(self, hist: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in hist.items()}

    def _gather(self, matrix: torch.Tensor, idx: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        if idx.numel() and int(idx.max()) >= matrix.shape[0]:
            raise ValueError(f"{kind} index {int(idx.max())} is beyond the {matrix.shape[0]} known {kind}s")
        return matrix[idx.clamp(min=0)], idx >= 0  # [B, N, H], [B, N]

    @torch.no_grad()
    def video_scores(self, hist: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cosine / temperature of each user against every video: [B, V] (CPU)."""
        hist = self._to_device(hist)
        user = self.model.user_video_vector(hist)  # [B, H]
        if not (self.time_features and self.age_terms):
            return (user @ self.video_matrix.T / self.temperature).cpu()  # [B, V]
        ts = hist["ts"].to(self.device)
        scores = torch.empty(len(user), self.num_videos, device=self.device)
        every = torch.arange(self.num_videos, device=self.device)
        for t in ts.unique().tolist():  # one in a serving batch: the rows share one clock reading
            rows = (ts == t).nonzero().squeeze(1)
            fresh = self.model.freshness_scores("video", every, t)  # [V]
            scores[rows] = user[rows] @ self._aged_video_matrix(t).T / self.temperature + fresh
        return scores.cpu()

    def _aged_video_matrix(self, t: int) -> torch.Tensor:
        """Every video's vector at request time t, age term included: [V, H].

        Kept until the first moment some video moves to its next age bucket, so requests arriving in between
        (about a second apart for 50k videos spread over days; many requests at serving rates) reuse it and
        pay only the matrix product."""
        if self._aged is not None and self._aged[0] <= t < self._aged[1]:
            return self._aged[2]
        age = t - self.video_pub_ts.to(self.device)
        buckets = self.model.age_buckets("video", torch.arange(self.num_videos, device=self.device), t)
        edges = time_bucket_edges(self.model.config.num_time_buckets).to(self.device)
        moving = buckets < len(edges)  # the last bucket is open-ended
        until = t + int((edges[buckets[moving]] - age[moving]).min()) if bool(moving.any()) else 2**62
        self._aged = (t, until, self.video_matrix + self.model.age_table("video")[buckets])
        return self._aged[2]

    @torch.no_grad()
    def video_candidate_scores(self, hist: dict[str, torch.Tensor], candidate_idx: torch.Tensor) -> torch.Tensor:
        """Scores of given videos [B, N] (-1 = padding, scored -inf): [B, N] (CPU)."""
        hist = self._to_device(hist)
        user = self.model.user_video_vector(hist)  # [B, H]
        items, valid = self._gather(self.video_matrix, candidate_idx, "video")
        scores = torch.einsum("bh,bnh->bn", user, items) / self.temperature
        if self.time_features and self.age_terms:
            idx = torch.as_tensor(candidate_idx, dtype=torch.long, device=self.device)
            scores = scores + self.model.age_scores("video", user, idx, hist["ts"].to(self.device)[:, None])
        return scores.masked_fill(~valid, float("-inf")).cpu()

    @torch.no_grad()
    def comment_scores(self, hist: dict[str, torch.Tensor], query_video_idx: torch.Tensor,
                       candidate_idx: torch.Tensor) -> torch.Tensor:
        """Scores of candidate comments [B, N] (-1 = padding, scored -inf) for users watching
        query_video_idx [B]: [B, N] (CPU)."""
        query = torch.as_tensor(query_video_idx, dtype=torch.long, device=self.device)
        hist = self._to_device(hist)
        context = self.model.comment_context_vector(hist, query)  # [B, H]
        items, valid = self._gather(self.comment_matrix, candidate_idx, "comment")
        scores = torch.einsum("bh,bnh->bn", context, items) / self.temperature
        if self.time_features and self.age_terms:
            idx = torch.as_tensor(candidate_idx, dtype=torch.long, device=self.device)
            # Each row of idx is that request's whole candidate list: the comment freshness pool.
            scores = scores + self.model.age_scores("comment", context, idx, hist["ts"].to(self.device)[:, None])
        return scores.masked_fill(~valid, float("-inf")).cpu()


def _grown_times(given: torch.Tensor | None, known: torch.Tensor | None, n: int, now: int, kind: str) -> torch.Tensor:
    """Publication times [n]: `given`, or the `known` ones extended with `now` for items that just arrived."""
    if given is not None:
        given = torch.as_tensor(given, dtype=torch.long)
        if given.shape != (n,):
            raise ValueError(f"{kind} publication times have shape {tuple(given.shape)}, expected ({n},)")
        return given
    if known is None:
        raise ValueError(f"no {kind} publication times given")
    if n < len(known):
        raise ValueError(f"the {kind} table shrank from {len(known)} to {n} rows without new publication times")
    return torch.cat([known, torch.full((n - len(known),), now, dtype=torch.long)])
