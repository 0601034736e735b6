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
