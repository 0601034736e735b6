"""Small building blocks shared by the SR model and the SASRec baseline.

Histories arrive right-aligned (see trainers/data.py): padding first, the newest element in the last slot,
with a boolean mask that is True on real elements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models.base import ModelSize


def position_ids(mask: torch.Tensor, max_position: int, randomize: bool) -> torch.Tensor:
    """Position ids for right-aligned histories, [B, L] -> [B, L] long.

    Slot j of a width-L batch gets id max_position - L + j, so the newest element is always
    max_position - 1 however wide the batch was padded. With `randomize` (stage 1, randomized positional
    encoding) the n real elements of a row get n sorted distinct ids drawn uniformly from [0, max_position).
    """
    batch, width = mask.shape
    if width > max_position:
        raise ValueError(f"history of width {width} is longer than max_position {max_position}")
    slots = torch.arange(width, device=mask.device)
    fixed = (max_position - width + slots).expand(batch, width)
    if not randomize:
        return fixed
    # A random permutation's first `width` values are a uniform sample of distinct ids; padding slots are
    # set to -1 so that after sorting they stay in front and the real slots get the sorted sample.
    perm = torch.rand(batch, max_position, device=mask.device).argsort(dim=1)[:, :width]
    perm = torch.where(mask, perm, torch.full_like(perm, -1))
    return perm.sort(dim=1).values.clamp(min=0)


MINUTE_MS = 60_000


def time_bucket_edges(num_buckets: int) -> torch.Tensor:
    """Lower edges (ms) of buckets 1 .. num_buckets - 1: one minute times sqrt(2)^k, rounded up to whole ms.

    Integer edges make the bucket of an integer age exact on every device and in every process, so training,
    evaluation and serving cannot disagree at a boundary.
    """
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
    return torch.tensor([math.ceil(MINUTE_MS * 2 ** (k / 2)) for k in range(num_buckets - 1)], dtype=torch.long)


def time_buckets(elapsed_ms: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Elapsed time (an item's age, or how long ago a history element happened) -> log-scale bucket, same shape.

    Bucket 0 is under a minute (negative times, i.e. clock skew or "not yet", count as 0); bucket k >= 1 starts
    at sqrt(2)^(k-1) minutes; the last bucket holds everything older (48 buckets reach about 16 years).
    """
    edges = time_bucket_edges(num_buckets).to(elapsed_ms.device)
    return torch.bucketize(elapsed_ms.long(), edges, right=True)


def causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """Attention allowed-mask for a causal encoder, [B, L] -> [B, 1, L, L] bool (True = may attend).

    A query attends to real keys at its own slot or before. Every slot may also attend to itself, so padding
    queries (and rows of an empty history) always have one key and never produce NaN; their outputs are
    masked out by whoever reads the states.
    """
    width = mask.shape[1]
    lower = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=mask.device)
    allowed = (lower & mask[:, None, :]) | eye  # [B, L, L]
    return allowed[:, None]


def safe_lookup(table: nn.Embedding, idx: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Embedding rows for idx [...] -> [..., H]; zero where idx < 0 (padding), idx is beyond the table
    (an item newer than the model) or seen[idx] is False (no ID signal learned in training)."""
    ok = (idx >= 0) & (idx < table.num_embeddings)
    safe = torch.where(ok, idx, torch.zeros_like(idx))
    if seen is not None:
        ok = ok & seen[safe]
    return table(safe) * ok.unsqueeze(-1)


class Attention(nn.Module):
    """Multi-head attention of queries [B, Lq, H] over keys/values [B, Lk, H] with an allowed-mask."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, lq, hidden = x.shape
        lk = context.shape[1]
        q = self.q(x).view(batch, lq, self.heads, -1).transpose(1, 2)  # [B, h, Lq, H/h]
        k, v = self.kv(context).view(batch, lk, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # [B, h, Lk, H/h]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # [B, h, Lq, H/h]
        return self.out(y.transpose(1, 2).reshape(batch, lq, hidden))


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention then a GELU feed-forward, each with a residual."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, dropout)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, allowed))
        return x + self.drop(self.ffn(self.norm2(x)))


class CausalEncoder(nn.Module):
    """A stack of causal blocks over one history: elements [B, L, H], mask [B, L] -> states [B, L, H]."""

    def __init__(self, size: ModelSize):
        super().__init__()
        self.blocks = nn.ModuleList(Block(size.hidden, size.num_heads, size.inner, size.dropout)
                                    for _ in range(size.num_layers))
        self.norm = nn.LayerNorm(size.hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        allowed = causal_mask(mask)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)


class NullAttention(nn.Module):
    """Attention over a set with one extra learned "nothing" slot that is always allowed.

    queries [B, Lq, H] attend over [null; keys] [B, 1 + Lk, H]; the null slot keeps empty or all-padding
    key sets well defined (no NaN) and lets a query say "nothing relevant here".
    """

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(hidden))
        self.attn = Attention(hidden, heads, dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, lq, _ = queries.shape
        null = self.null.expand(batch, 1, -1)
        context = torch.cat([null, keys], dim=1)  # [B, 1 + Lk, H]
        allowed = torch.cat([torch.ones_like(key_mask[:, :1]), key_mask], dim=1)  # [B, 1 + Lk]
        allowed = allowed[:, None, None, :].expand(batch, 1, lq, allowed.shape[1])
        return self.attn(queries, context, allowed)  # [B, Lq, H]
