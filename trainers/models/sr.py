"""The LSVCR sequential recommendation (SR) model (DESIGN.md section 6).

Inputs are index tensors from trainers/data.py (right-aligned histories, -1 = padding or "none"); the text
embedding matrices of the features folder are attached with `set_text_tables` (not part of the checkpoint:
they belong to the features folder and grow as new items arrive), which makes it a `TextRecommender`
(trainers/models/base.py).

Every vector the task methods return is L2-normalised; score = dot / temperature, i.e. cosine / temperature.

Choices beyond DESIGN.md:
- items and history elements share one item vector per kind: adapted text (Linear D -> H) plus, with ID
  embeddings, sigmoid(gate) * ID embedding, the ID part zero for items not seen in training (`set_seen`)
  or newer than the ID table; with `id_shrinkage` it is also scaled by n / (n + k), n the item's train
  appearances and k learned per kind, so the barely trained ID row of a cold item cannot pull its score far;
- the cross "mix" attention and both poolings have a learned null slot, so an empty history (or an empty
  other history) is well defined: a user without video history gets one learned cold-start vector;
- comment task: the query video's vector attends over the fused comment-history states; the result, the
  video-task user vector (before normalisation) and the query video vector go through a small MLP to give
  the user-in-context vector. So a user without comment history still gets a context from their videos.
  With `history_match` the mean of the user's history comments' item vectors is added to it (weight learned,
  starting at 1): the comments a user engaged with are in the candidates' own space, so the plain "like what
  they liked before" match is there from the first step instead of having to be learned through the encoders
  (measured: that match alone beat every trained model on the default set's comment task, 0.48 vs 0.27).

Time features (`time_features`, issue 8): the batch carries the request time `ts` [B] (an example's event time
offline, the wall clock in serving) and the history times. Both are bucketized by the one function
`layers.time_buckets`:
- each history element gets a gap embedding, bucket(ts - element time), added like the position embedding;
- each scored item gets an age term, bucket(ts - publication time) looked up in a [num_buckets, H] table and
  added to the *normalised* item vector: item = normalize(text (+ ID)) + age[bucket]. So a whole-corpus
  ranking stays one precomputed matrix product plus a [B, num_buckets] table gathered per item
  (trainers/scoring.py), exactly. The age tables start at zero;
- with `freshness`, a user-independent score over continuous log-age and the item's freshness relative to
  its pool is added (trainers/models/item_time.py, shared with SASRec).
Publication times are attached with `set_item_times` (like the text tables, not part of the checkpoint).
A config saved before these features existed lacks the field and loads with them off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.config import require, require_at_least
from trainers.models.base import ModelSize
from trainers.models.item_time import ItemTimes
from trainers.models.layers import CausalEncoder, NullAttention, position_ids, safe_lookup, time_buckets

ID_SHRINK_K = 5.0  # initial k of id_shrinkage: an item with 5 train appearances starts with half its ID part


@dataclass
class SRConfig:
    num_videos: int = 0  # size of the video ID table (rows of video_emb.npy at training time)
    num_comments: int = 0  # size of the comment ID table
    text_dim: int = 384
    size: ModelSize = field(default_factory=ModelSize)
    max_position: int = 0  # size of the position tables; 0 means size.max_history
    use_id_embedding: bool = True  # gated ID embeddings (stage 2); False = the text-only model
    random_positions: bool = False  # stage 1: randomized sorted position ids while training
    # Item age and history-gap embeddings. False by default so that a saved config without the field (a
    # checkpoint from before them) loads as the model it was; the training configs turn them on.
    time_features: bool = False
    num_time_buckets: int = 48  # log-time buckets of layers.time_buckets (48 reach about 16 years)
    # The user-independent freshness score (trainers/models/item_time.py); needs time_features. False by
    # default for the same reason as time_features.
    freshness: bool = False
    id_shrinkage: bool = False  # ID part x n / (n + k) (module docstring); False for configs saved before it
    history_match: bool = False  # comment context + w x mean history comment vector (module docstring); likewise

    def __post_init__(self):
        if self.max_position == 0:
            self.max_position = self.size.max_history
        require_at_least(self, 1, "text_dim")
        require_at_least(self, 0, "num_videos", "num_comments")
        for name in ("num_videos", "num_comments"):
            require(self, getattr(self, name) >= 1 or not self.use_id_embedding, name,
                    "must be >= 1 with use_id_embedding")
        require_at_least(self, 2, "num_time_buckets")
        require(self, self.time_features or not self.freshness, "freshness", "needs time_features=True")
        require(self, self.use_id_embedding or not self.id_shrinkage, "id_shrinkage", "needs use_id_embedding=True")
        require(self, self.max_position >= self.size.max_history, "max_position",
                f"must be >= size.max_history {self.size.max_history}")

    @property
    def text_only(self) -> bool:
        return not self.use_id_embedding


class SRModel(ItemTimes, nn.Module):
    def __init__(self, config: SRConfig):
        super().__init__()
        self.config = config
        size = config.size
        self.temperature = size.temperature
        h = size.hidden
        self.video_adapter = nn.Linear(config.text_dim, h)
        self.comment_adapter = nn.Linear(config.text_dim, h)
        if config.use_id_embedding:
            self.video_id = nn.Embedding(config.num_videos, h)
            self.comment_id = nn.Embedding(config.num_comments, h)
            nn.init.normal_(self.video_id.weight, std=0.02)
            nn.init.normal_(self.comment_id.weight, std=0.02)
            # Per-dimension gates (sigmoid) on the ID part; items never seen in training get no ID part.
            self.video_gate = nn.Parameter(torch.zeros(h))
            self.comment_gate = nn.Parameter(torch.zeros(h))
            self.register_buffer("video_seen", torch.zeros(config.num_videos, dtype=torch.bool))
            self.register_buffer("comment_seen", torch.zeros(config.num_comments, dtype=torch.bool))
        # Element merges: [video part; comment part] -> hidden.
        self.video_merge = nn.Linear(2 * h, h)
        self.comment_merge = nn.Linear(2 * h, h)
        self.video_pos = nn.Embedding(config.max_position, h)
        self.comment_pos = nn.Embedding(config.max_position, h)
        nn.init.normal_(self.video_pos.weight, std=0.02)
        nn.init.normal_(self.comment_pos.weight, std=0.02)
        self.drop = nn.Dropout(size.dropout)
        self.video_encoder = CausalEncoder(size)
        self.comment_encoder = CausalEncoder(size)
        # Mix layer: each history's states attend to the other's (no causal mask: both are the past).
        self.mix_video = NullAttention(h, size.num_heads, size.dropout)
        self.mix_comment = NullAttention(h, size.num_heads, size.dropout)
        self.video_fuse = nn.Sequential(nn.Linear(2 * h, h), nn.LayerNorm(h))
        self.comment_fuse = nn.Sequential(nn.Linear(2 * h, h), nn.LayerNorm(h))
        # Video task: additive attention pooling, w^T tanh(W s), over [null; video states].
        self.pool_null = nn.Parameter(torch.zeros(h))
        self.pool_proj = nn.Linear(h, h)
        self.pool_score = nn.Linear(h, 1, bias=False)
        # Comment task: the query video attends over the comment-history states; the result, the video-task
        # user vector and the query video vector are merged into the user-in-context vector.
        self.query_proj = nn.Linear(h, h)
        self.comment_attn = NullAttention(h, size.num_heads, size.dropout)
        self.context_mlp = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, h))
        self.register_buffer("video_text", torch.zeros(0, config.text_dim), persistent=False)
        self.register_buffer("comment_text", torch.zeros(0, config.text_dim), persistent=False)
        if config.time_features:
            # Created last: with the same seed every other parameter is initialised as without time features.
            n = config.num_time_buckets
            self.video_gap = nn.Embedding(n, h)
            self.comment_gap = nn.Embedding(n, h)
            nn.init.normal_(self.video_gap.weight, std=0.02)
            nn.init.normal_(self.comment_gap.weight, std=0.02)
            self.init_item_times(h)
        if config.history_match:
            self.history_weight = nn.Parameter(torch.ones(()))
        if config.id_shrinkage:
            # Created last for the same reason. Counts are part of the checkpoint, like the seen masks.
            self.register_buffer("video_count", torch.zeros(config.num_videos))
            self.register_buffer("comment_count", torch.zeros(config.num_comments))
            self.id_log_k = nn.Parameter(torch.full((2,), math.log(ID_SHRINK_K)))

    # ---- data the model does not own -------------------------------------------------------------------

    def set_text_tables(self, video_text: torch.Tensor, comment_text: torch.Tensor) -> None:
        """Attach the text embedding matrices [V, D] and [C, D] (rows = item index)."""
        for name, table in (("video", video_text), ("comment", comment_text)):
            if table.ndim != 2 or table.shape[1] != self.config.text_dim:
                raise ValueError(f"{name} text table has shape {tuple(table.shape)}, "
                                 f"expected [N, {self.config.text_dim}]")
        device = self.video_adapter.weight.device
        self.video_text = video_text.to(device=device, dtype=torch.float32)
        self.comment_text = comment_text.to(device=device, dtype=torch.float32)

    def set_seen(self, video_seen: torch.Tensor, comment_seen: torch.Tensor) -> None:
        """Mark which item indices have a trained ID embedding: bool masks, or train appearance counts
        [num_videos], [num_comments] (seen = count > 0; with id_shrinkage the counts scale the ID part)."""
        if not self.config.use_id_embedding:
            return
        video_seen, comment_seen = torch.as_tensor(video_seen), torch.as_tensor(comment_seen)
        self.video_seen.copy_(video_seen > 0)
        self.comment_seen.copy_(comment_seen > 0)
        if self.config.id_shrinkage:
            self.video_count.copy_(video_seen.float())
            self.comment_count.copy_(comment_seen.float())

    def _id_part(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        """sigmoid(gate) * ID embedding (x n / (n + k) with id_shrinkage): [...] -> [..., H]."""
        video = kind == "video"
        table, seen = (self.video_id, self.video_seen) if video else (self.comment_id, self.comment_seen)
        part = torch.sigmoid(self.video_gate if video else self.comment_gate) * safe_lookup(table, idx, seen)
        if not self.config.id_shrinkage:
            return part
        counts = self.video_count if video else self.comment_count
        n = counts[idx.clamp(min=0, max=len(counts) - 1)]  # beyond the table: safe_lookup gave zeros already
        return part * (n / (n + self.id_log_k[0 if video else 1].exp())).unsqueeze(-1)

    # ---- item vectors (before normalisation) -----------------------------------------------------------

    def _text(self, table: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
        if table.shape[0] == 0:
            raise RuntimeError(f"no {kind} text table attached: call set_text_tables first")
        return table[idx.clamp(min=0)]  # [..., D]

    def video_vec(self, idx: torch.Tensor) -> torch.Tensor:
        """Adapted title text (+ gated ID) per video index: [...] -> [..., H]; zeros where idx < 0."""
        x = self.video_adapter(self._text(self.video_text, idx, "video"))
        if self.config.use_id_embedding:
            x = x + self._id_part("video", idx)
        return x * (idx >= 0).unsqueeze(-1)

    def comment_vec(self, idx: torch.Tensor) -> torch.Tensor:
        """Adapted comment text (+ gated ID) per comment index: [...] -> [..., H]; zeros where idx < 0."""
        x = self.comment_adapter(self._text(self.comment_text, idx, "comment"))
        if self.config.use_id_embedding:
            x = x + self._id_part("comment", idx)
        return x * (idx >= 0).unsqueeze(-1)

    # ---- time --------------------------------------------------------------------------------------------

    @staticmethod
    def _request_time(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ts" not in batch:
            raise ValueError("time_features needs the request time: the batch has no 'ts' [B] (collate adds it "
                             "from the example rows; Scorer.histories from the clock)")
        return batch["ts"]

    def id_text_vectors(self, kind: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ID embedding, adapted text embedding) of the same items, both L2-normalised [N, H] (for the
        stage 2 ID-text contrast)."""
        if not self.config.use_id_embedding:
            raise RuntimeError("id_text_vectors needs use_id_embedding=True")
        if kind == "video":
            ids, text = self.video_id(idx), self.video_adapter(self._text(self.video_text, idx, kind))
        elif kind == "comment":
            ids, text = self.comment_id(idx), self.comment_adapter(self._text(self.comment_text, idx, kind))
        else:
            raise ValueError(f"kind must be 'video' or 'comment', got {kind!r}")
        return F.normalize(ids, dim=-1), F.normalize(text, dim=-1)

    # ---- histories -------------------------------------------------------------------------------------

    def encode_histories(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal encoder states of each history before the mix: ([B, Lv, H], [B, Lc, H])."""
        cfg = self.config
        randomize = cfg.random_positions and self.training
        v_mask, c_mask = batch["hist_video_mask"], batch["hist_cmt_mask"]
        # Video element: merge(title vector, hot comment vector) + position.
        v_elem = self.video_merge(
            torch.cat([self.video_vec(batch["hist_video"]), self.comment_vec(batch["hist_video_hot"])], -1)
        )  # [B, Lv, H]
        v_elem = v_elem + self.video_pos(position_ids(v_mask, cfg.max_position, randomize))
        if cfg.time_features:
            # How long before the request each element happened: [B, Lv] buckets.
            ts = self._request_time(batch)[:, None]  # [B, 1]
            v_elem = v_elem + self.video_gap(time_buckets(ts - batch["hist_video_ts"], cfg.num_time_buckets))
        # Comment-section element: merge(video vector, mean of up to 3 comment vectors) + position.
        cmts = batch["hist_cmt_comments"]  # [B, Lc, 3]
        count = (cmts >= 0).sum(-1, keepdim=True).clamp(min=1)  # [B, Lc, 1]
        cmt_mean = self.comment_vec(cmts).sum(-2) / count  # [B, Lc, H]
        c_elem = self.comment_merge(torch.cat([self.video_vec(batch["hist_cmt_video"]), cmt_mean], -1))
        c_elem = c_elem + self.comment_pos(position_ids(c_mask, cfg.max_position, randomize))
        if cfg.time_features:
            c_elem = c_elem + self.comment_gap(time_buckets(ts - batch["hist_cmt_ts"], cfg.num_time_buckets))
        v_states = self.video_encoder(self.drop(v_elem), v_mask)
        c_states = self.comment_encoder(self.drop(c_elem), c_mask)
        return v_states, c_states

    def _fused_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Own + mixed states of both histories, projected to hidden: ([B, Lv, H], [B, Lc, H])."""
        v_mask, c_mask = batch["hist_video_mask"], batch["hist_cmt_mask"]
        v_states, c_states = self.encode_histories(batch)
        v_mixed = self.mix_video(v_states, c_states, c_mask)  # video states attend to comment states
        c_mixed = self.mix_comment(c_states, v_states, v_mask)  # and back
        v_fused = self.video_fuse(torch.cat([v_states, v_mixed], -1))
        c_fused = self.comment_fuse(torch.cat([c_states, c_mixed], -1))
        return v_fused, c_fused

    def _pool_video(self, v_fused: torch.Tensor, v_mask: torch.Tensor) -> torch.Tensor:
        """Additive attention pooling over [null; video states] -> [B, H] (null = cold-start user)."""
        batch = v_fused.shape[0]
        states = torch.cat([self.pool_null.expand(batch, 1, -1), v_fused], 1)  # [B, 1 + Lv, H]
        mask = torch.cat([torch.ones_like(v_mask[:, :1]), v_mask], 1)  # [B, 1 + Lv]
        logits = self.pool_score(torch.tanh(self.pool_proj(states))).squeeze(-1)  # [B, 1 + Lv]
        weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return (weights.unsqueeze(-1) * states).sum(1)  # [B, H]

    # ---- the four methods serving and evaluation use ------------------------------------------------

    def user_video_vector(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        v_fused, _ = self._fused_states(batch)
        return F.normalize(self._pool_video(v_fused, batch["hist_video_mask"]), dim=-1)  # [B, H]

    def video_item_vectors(self, idx: torch.Tensor, ts: torch.Tensor | None = None) -> torch.Tensor:
        """[...] -> [..., H]: the normalised video vector, plus its age term at request times ts (needed, and
        only used, with time features; broadcastable to idx)."""
        return self.with_age("video", F.normalize(self.video_vec(idx), dim=-1), idx, ts)

    def comment_context_vector(self, batch: dict[str, torch.Tensor], query_video: torch.Tensor) -> torch.Tensor:
        v_fused, c_fused = self._fused_states(batch)
        user = self._pool_video(v_fused, batch["hist_video_mask"])  # [B, H]
        return F.normalize(self._context(batch, c_fused, user, query_video), dim=-1)  # [B, H]

    def _context(self, batch: dict[str, torch.Tensor], c_fused: torch.Tensor, user: torch.Tensor,
                 query_video: torch.Tensor) -> torch.Tensor:
        """The user-in-context vector before normalisation, [B, H]."""
        query = self.video_vec(query_video)  # [B, H]
        attended = self.comment_attn(self.query_proj(query).unsqueeze(1), c_fused, batch["hist_cmt_mask"])
        context = self.context_mlp(torch.cat([attended.squeeze(1), user, query], -1))
        if self.config.history_match:
            context = context + self.history_weight * self.history_comments(batch)
        return context

    def history_comments(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the normalised item vectors of every comment in the comment history, [B, H] (zero for an
        empty one): in the candidates' own space, so context . candidate starts as "like what they engaged
        with before" (history_match)."""
        cmts = batch["hist_cmt_comments"]  # [B, Lc, 3]
        valid = (cmts >= 0) & batch["hist_cmt_mask"].unsqueeze(-1)
        vectors = F.normalize(self.comment_vec(cmts), dim=-1) * valid.unsqueeze(-1)
        return vectors.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1).unsqueeze(-1)

    def comment_item_vectors(self, idx: torch.Tensor, ts: torch.Tensor | None = None) -> torch.Tensor:
        """Like video_item_vectors, for comments: [...] -> [..., H]."""
        return self.with_age("comment", F.normalize(self.comment_vec(idx), dim=-1), idx, ts)

    def timeless_item_vectors(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        """The normalised item vectors without the age term, [...] -> [..., H] (the precomputed corpus
        matrices of trainers/scoring.py; with time features the age term is added per request)."""
        if kind == "video":
            return F.normalize(self.video_vec(idx), dim=-1)
        if kind == "comment":
            return F.normalize(self.comment_vec(idx), dim=-1)
        raise ValueError(f"kind must be 'video' or 'comment', got {kind!r}")

    # ---- stage 1 -----------------------------------------------------------------------------------------

    def stage1_vectors(self, batch: dict[str, torch.Tensor], query_video: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """Both task heads' user vectors from one pass over the histories, L2-normalised [B, H]: "video_head"
        (the video task's user vector) and "comment_head" (the comment task's user-in-context vector under
        query_video; for a video-task row, under the newest video of its history, the one just watched, or
        video 0 for an empty history). Stage 1's losses use the head of the row's task, and the video-comment
        contrast both (trainers/losses.vc_contrast)."""
        v_fused, c_fused = self._fused_states(batch)
        pooled = self._pool_video(v_fused, batch["hist_video_mask"])  # [B, H]
        if query_video is None:
            query_video = batch["hist_video"][:, -1].clamp(min=0)  # right-aligned: the last column is the newest
        comment = self._context(batch, c_fused, pooled, query_video)
        return {"video_head": F.normalize(pooled, dim=-1), "comment_head": F.normalize(comment, dim=-1)}

    def zero_id_embeddings(self) -> None:
        """Start the ID tables at zero, so a stage 2 model initialised from a text-only stage 1 checkpoint
        computes exactly the stage 1 function until training moves them (their gradient through the gate
        is not zero)."""
        if self.config.use_id_embedding:
            with torch.no_grad():
                self.video_id.weight.zero_()
                self.comment_id.weight.zero_()
