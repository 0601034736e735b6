from pathlib import Path

import numpy as np
import pytest

from features.embeddings import (
    HashEncoder,
    MiniLMEncoder,
    MiniLMFloat32Encoder,
    encoder_dim,
    encoder_key,
    length_batches,
    make_encoder,
    minilm_path,
)


def test_hash_encoder_is_deterministic_and_normalised():
    enc = HashEncoder(dim=16)
    emb = enc.encode(["Cute cat", "cute CAT!", "", "stock market"])
    assert emb.shape == (4, 16) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert np.allclose(emb[0], emb[1])  # same words after lower-casing and dropping punctuation
    assert emb[2].tolist() == [1.0] + [0.0] * 15  # an empty text still has unit length
    assert np.allclose(HashEncoder(dim=16).encode(["stock market"])[0], emb[3])


def test_make_encoder_by_name():
    assert isinstance(make_encoder("hash", dim=8), HashEncoder)
    assert encoder_dim("hash", 8) == 8 and encoder_dim("minilm") == 384
    with pytest.raises(ValueError, match="unknown encoder"):
        make_encoder("word2vec")


def test_minilm_loads_offline_from_the_package_and_ranks_similar_texts_closer():
    assert (minilm_path() / "model.safetensors").exists()
    enc = MiniLMEncoder(threads=2)
    emb = enc.encode(["a cat sleeps on the sofa", "a kitten is napping on the couch", "interest rates rose again"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_length_batches_group_similar_lengths_within_the_token_budget():
    lengths = np.array([3, 10, 2, 10, 7, 1])
    batches = length_batches(lengths, max_tokens=20)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2, 5]]  # longest first; 2 x 10, 2 x 7, 2 x 2 tokens
    assert length_batches(np.array([50, 4]), max_tokens=20)[0].tolist() == [0]  # a row over the budget runs alone


class FakeSentenceTransformer:
    """Stands in for the packaged model: a text's vector is a function of its own tokens only (padding masked),
    and every forward's padded shape is recorded."""

    shapes: list[tuple[int, int]] = []

    def __init__(self, path, device="cpu", local_files_only=True):
        FakeSentenceTransformer.shapes = []

    def eval(self):
        return self

    def to(self, dtype):
        return self

    def get_embedding_dimension(self):
        return 384

    def preprocess(self, texts):
        import torch

        ids = [[101, *(len(w) for w in t.split()), 102] for t in texts]  # a token per word, its length as id
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
                "modality": "text"}

    def __call__(self, batch):
        import torch

        FakeSentenceTransformer.shapes.append(tuple(batch["input_ids"].shape))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        emb = torch.zeros(len(ids), 384)
        emb[:, 0] = mask.sum(1).float()  # token count
        emb[:, 1] = (ids * mask).sum(1).float()  # sum of ids
        emb[:, 2] = 1.0
        return {"sentence_embedding": emb}


def test_minilm_encode_pads_per_length_batch_and_keeps_the_callers_order(monkeypatch):
    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FakeSentenceTransformer)
    enc = MiniLMEncoder(threads=1, max_tokens=12)
    texts = ["a bb", "one two three four five six seven eight nine ten", "", "ccc", "x y z w"]
    got = enc.encode(texts)
    # Tokens 4, 12, 2, 3, 6: the 12 alone, then (6, 4) padded to 6 and (3, 2) padded to 3.
    assert FakeSentenceTransformer.shapes == [(1, 12), (2, 6), (2, 3)]
    ids = [[101, *(len(w) for w in t.split()), 102] for t in texts]
    expected = np.zeros((5, 384), np.float32)
    expected[:, :3] = [[len(i), sum(i), 1.0] for i in ids]
    assert np.allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True))
    assert np.array_equal(got, np.concatenate([enc.encode([t]) for t in texts]))
    assert enc.encode([]).shape == (0, 384)


def test_bfloat16_minilm_stays_within_cosine_099_of_float32():
    from benchmarks.features import long_tailed_texts, short_texts

    texts = short_texts(48, seed=1) + long_tailed_texts(48, seed=1)  # up to MiniLM's 256 tokens
    fast, exact = MiniLMEncoder(threads=2), MiniLMFloat32Encoder(threads=2)
    got, expected = fast.encode(texts), exact.encode(texts)
    assert got.shape == (96, 384) and got.dtype == np.float32
    assert (got * expected).sum(1).min() >= 0.99
    # The float32 path with length batches gives what one float32 forward over the whole batch gave.
    whole = exact.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
    assert (expected * whole).sum(1).min() >= 0.9999


def test_float32_and_bfloat16_minilm_never_share_an_embedding_cache():
    import hashlib

    assert encoder_key("minilm") != encoder_key("minilm-float32")
    # "minilm" was float32 before its default became bfloat16: its cache folder changed with it.
    before = "minilm-384-" + hashlib.blake2b(b"minilm\x1f384", digest_size=6).hexdigest()
    assert encoder_key("minilm") != before
    assert encoder_key("hash", 8) == "hash-8-" + hashlib.blake2b(b"hash\x1f8", digest_size=6).hexdigest()


def test_hf_encoder_mean_pooling_matches_the_packaged_minilm():
    """MiniLM is itself mean pooling + L2: the generic HF path on its folder must give the same vectors."""
    texts = ["a cat sleeps on the sofa", "interest rates rose again", ""]
    generic = make_encoder(f"hf:{minilm_path()}", threads=2)
    assert generic.dim == 384 and encoder_dim(f"hf:{minilm_path()}") == 384
    got = generic.encode(texts[:2])
    expected = MiniLMEncoder(threads=2).encode(texts[:2])
    assert np.allclose((got * expected).sum(1), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="no such local model"):
        make_encoder("hf:/nonexistent/model")


def test_llm_encoder_from_the_packaged_gguf():
    from features.embeddings import LLMEncoder, llm_gguf_path

    assert llm_gguf_path().suffix == ".gguf"
    enc = LLMEncoder(threads=2)
    emb = enc.encode(["a cat sleeps on the sofa", "a kitten naps on the couch", "interest rates rose again"])
    assert emb.shape == (3, 576) and encoder_dim("llm") == 576
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_content_hash_and_cache_roundtrip(tmp_path):
    from features.embeddings import EmbeddingCache, content_hash

    h = content_hash(["a", "b", "a"])
    assert h.dtype == np.dtype("U32") and h[0] == h[2] and h[0] != h[1]
    cache = EmbeddingCache(tmp_path, "hash-4", 4)
    found, vectors = cache.lookup(h)
    assert not found.any() and vectors.shape == (3, 4)
    cache.add(content_hash(["a"]), np.array([[1, 0, 0, 0]], np.float32))
    found, vectors = cache.lookup(content_hash(["b", "a", "a"]))
    assert found.tolist() == [False, True, True]
    assert vectors[1:].tolist() == [[1, 0, 0, 0]] * 2 and vectors[0].tolist() == [0] * 4


@pytest.mark.integration
def test_embed_texts_embeds_each_new_text_once(tmp_path, ray_session):
    import pyarrow.parquet as pq

    from features.embeddings import embed_texts

    cache = tmp_path / "cache"
    stats = {}
    texts = ["red fox", "blue sky", "red fox", "green tea"]
    dim = embed_texts(texts, tmp_path / "a.npy", encoder="hash", dim=8, cache_dir=cache, ids=["1", "2", "3", "4"],
                      stats=stats)
    assert dim == 8 and stats == {"embedded": 3, "cached": 0}  # "red fox" twice, embedded once
    a = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert np.allclose(a, HashEncoder(8).encode(texts), atol=1e-6)
    table = pq.read_table(tmp_path / "a.parquet")
    assert table["idx"].to_pylist() == [0, 1, 2, 3] and table["id"].to_pylist() == ["1", "2", "3", "4"]
    assert np.allclose(np.array(table["emb"].to_pylist(), np.float32), a)
    # A second build: only the new text is embedded.
    embed_texts(["green tea", "new words", "red fox"], tmp_path / "b.npy", encoder="hash", dim=8, cache_dir=cache,
                stats=stats)
    assert stats == {"embedded": 1, "cached": 2}
    assert np.allclose(np.load(tmp_path / "b.npy"), HashEncoder(8).encode(["green tea", "new words", "red fox"]),
                       atol=1e-6)


def test_a_few_texts_are_embedded_in_this_process_as_the_ray_path_does(tmp_path):
    from features.embeddings import embed_texts, local_encoder

    texts = ["a much longer text than the others", "red fox", "blue sky", "tea"]
    dim = embed_texts(texts, tmp_path / "a.npy", encoder="hash", dim=8, batch_size=3, local_texts=4)  # no Ray here
    assert dim == 8
    assert np.allclose(np.load(tmp_path / "a.npy"), HashEncoder(8).encode(texts), atol=1e-6)  # rows in order
    assert local_encoder("hash", 8) is local_encoder("hash", 8)  # loaded once per process


def save_lora(base: Path, out: Path, seed: int | None) -> Path:
    """A PEFT LoRA adapter over `base` as stage 1 saves one; seed None leaves lora_B at PEFT's zeros (the
    adapter changes nothing), a seed fills every LoRA weight at random."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in lm.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    lm.save_pretrained(str(out))
    return out


def test_lora_encoder_tables_come_from_the_adapter(tiny_llm, tmp_path):
    import shutil

    from features.embeddings import LORA_PREFIX

    texts = ["below is a user's history", "the next video", "comment sections 12 13"]
    base = make_encoder(f"hf:{tiny_llm}").encode(texts)
    untrained = save_lora(tiny_llm, tmp_path / "zero", None)
    trained = save_lora(tiny_llm, tmp_path / "trained", seed=1)
    # lora_B = 0: the merged model is the base model, so the tables are the base encoder's.
    assert np.allclose(make_encoder(f"{LORA_PREFIX}{untrained}").encode(texts), base, atol=1e-5)
    aligned = make_encoder(f"{LORA_PREFIX}{trained}").encode(texts)
    assert aligned.shape == base.shape and encoder_dim(f"{LORA_PREFIX}{trained}") == base.shape[1]
    assert np.allclose(np.linalg.norm(aligned, axis=1), 1.0, atol=1e-5)
    assert (aligned * base).sum(1).min() < 0.99  # the adapter moved every table it touched
    # Cached by the adapter's weights: a copy elsewhere shares the key, another adapter does not.
    shutil.copytree(trained, tmp_path / "copy")
    assert encoder_key(f"{LORA_PREFIX}{trained}") == encoder_key(f"{LORA_PREFIX}{tmp_path / 'copy'}")
    assert encoder_key(f"{LORA_PREFIX}{trained}") != encoder_key(f"{LORA_PREFIX}{untrained}")


def test_lora_encoder_errors_name_what_is_missing(tiny_llm, tmp_path):
    import json

    from features.embeddings import check_encoder_name

    with pytest.raises(ValueError, match="no PEFT adapter"):
        check_encoder_name(f"lora:{tmp_path}")
    adapter = save_lora(tiny_llm, tmp_path / "adapter", seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/llm"}))
    with pytest.raises(ValueError, match="base model '/gone/llm' is not on this machine"):
        make_encoder(f"lora:{adapter}")
