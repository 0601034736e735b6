import numpy as np
import pytest

from features.embeddings import HashEncoder, MiniLMEncoder, encoder_dim, make_encoder, minilm_path


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
