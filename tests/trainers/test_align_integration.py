import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import contract
from features.embeddings import LORA_PREFIX, make_encoder
from features.folder import FeaturesFolder
from tests.trainers.conftest import make_features
from trainers.align import ALIGNED_FEATURES, AlignConfig, align
from trainers.checkpoint import load_model, read_weights
from trainers.finetune import FinetuneConfig, finetune
from trainers.models import ModelSize

pytestmark = pytest.mark.integration

SIZE = ModelSize(hidden=16, num_heads=2, inner=32, num_layers=1, max_history=8)


def test_align_then_finetune_on_two_workers(ray_session, tiny_llm, tmp_path, monkeypatch):
    """LoRA stage 1 over the base LLM's own item tables, the export of the aligned LLM's tables, and stage 2
    over them."""
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    features = make_features(tmp_path / "features", num_users=100)
    texts = {kind: FeaturesFolder(features).videos(["text"]) if kind == "video" else
             FeaturesFolder(features).comments(["text"]) for kind in ("video", "comment")}
    base = {kind: make_encoder(f"hf:{tiny_llm}").encode(t["text"].to_pylist()) for kind, t in texts.items()}
    np.save(features / contract.VIDEO_EMB, base["video"])
    np.save(features / contract.COMMENT_EMB, base["comment"])
    manifest = json.loads((features / contract.MANIFEST).read_text())
    (features / contract.MANIFEST).write_text(json.dumps({**manifest, "encoder": f"hf:{tiny_llm}"}))
    config = dict(features=str(features), out=str(tmp_path / "aligned"), llm=str(tiny_llm), llm_mode="lora",
                  max_steps=4, batch_size=8, checkpoint_every=2, max_prompt_tokens=96, num_workers=2, log_every=2,
                  size=SIZE, export_item_tables=True, lr=1e-2)
    with pytest.raises(ValueError, match="needs llm_mode lora"):
        align(AlignConfig(**{**config, "llm_mode": "frozen"}))
    aligned = align(AlignConfig(**config))
    kind, model = load_model(aligned)
    assert kind == "sr" and not model.config.random_positions and not model.config.use_id_embedding
    info = json.loads((tmp_path / "aligned" / "train.json").read_text())
    assert info["step"] == 4 and info["workers"] == 2 and info["examples_per_s"] > 0 and info["tokens_per_s"] > 0
    assert info["lm_loss"] > 0 and info["seq_sup_loss"] > 0 and info["vc_loss"] > 0
    assert (tmp_path / "aligned" / "llm" / "lora" / "adapter_model.safetensors").is_file()
    # The exported tables are the aligned LLM's: the base LLM with this run's adapter merged in, not the base.
    exported = tmp_path / "aligned" / ALIGNED_FEATURES
    aligned_llm = make_encoder(f"{LORA_PREFIX}{tmp_path / 'aligned' / 'llm' / 'lora'}")
    for kind, name in (("video", contract.VIDEO_EMB), ("comment", contract.COMMENT_EMB)):
        table = np.load(exported / name)
        assert np.allclose(table, aligned_llm.encode(texts[kind]["text"].to_pylist()), atol=1e-5)
        assert (table * base[kind]).sum(1).min() < 1 - 1e-4
    assert json.loads((exported / contract.MANIFEST).read_text())["encoder"].startswith(LORA_PREFIX)
    out = finetune(FinetuneConfig(features=str(exported), out=str(tmp_path / "lsvcr"), init=aligned, epochs=1,
                                  num_workers=2, batch_size=64, max_eval_examples=100, size=SIZE))
    train = json.loads((tmp_path / "lsvcr" / "train.json").read_text())
    assert load_model(out)[0] == "sr" and train["finetune_config"]["init"] == aligned


def test_frozen_mode_samples_centres_and_reuses_the_llm_states(ray_session, tiny_llm, tmp_path, monkeypatch):
    """Frozen stage 1 end to end: a seeded random sample of max_examples rows per task gets LLM states, their
    mean is saved as the task's centre, and a second run (another seed) reuses them."""
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    features = make_features(tmp_path / "features", num_users=60)
    config = dict(features=str(features), llm=str(tiny_llm), llm_mode="frozen", max_examples=40, epochs=1,
                  batch_size=8, max_prompt_tokens=96, num_workers=2, size=SIZE, item_contrast=True)
    align(AlignConfig(out=str(tmp_path / "a0"), seed=0, **config))
    state_folders = sorted((tmp_path / "cache" / "llm_states").glob("*/*"), key=lambda p: p.name)
    assert [p.name for p in state_folders] == ["comment", "video"]
    for folder in state_folders:
        states = pa.concat_tables(pq.read_table(p, columns=["event_id", "llm_state"])
                                  for p in folder.glob("*.parquet")).to_pydict()
        assert len(states["event_id"]) == 40 == len(set(states["event_id"]))
        mean = np.load(folder / "mean.npy")
        assert np.allclose(mean, np.mean(states["llm_state"], axis=0), atol=1e-5)
        stamp = folder.stat().st_mtime_ns
    means = read_weights(tmp_path / "a0" / "llm" / "state_means.safetensors")
    assert sorted(means) == ["comment", "video"]
    info = json.loads((tmp_path / "a0" / "train.json").read_text())
    assert info["seq_sup_loss"] > 0 and info["vc_loss"] > 0 and info["item_loss"] > 0 and info["examples"] == 80
    # The LLM's item vectors, one row per item and centred per kind (trainers/item_alignment.py).
    tables = {p.stem: np.load(p) for p in (tmp_path / "cache" / "llm_items").glob("*/*.npy")}
    texts = FeaturesFolder(features)
    assert [len(tables["video"]), len(tables["comment"])] == [texts.videos().num_rows, texts.comments().num_rows]
    assert all(np.abs(t.mean(0)).max() < 1e-4 for t in tables.values())
    align(AlignConfig(out=str(tmp_path / "a1"), seed=1, **config))
    assert sorted((tmp_path / "cache" / "llm_states").glob("*/*"), key=lambda p: p.name) == state_folders
    assert state_folders[-1].stat().st_mtime_ns == stamp  # not computed again


def test_llm_mode_none_is_rec_pretraining_without_an_llm(ray_session, tmp_path):
    features = make_features(tmp_path / "features", num_users=60)
    out = align(AlignConfig(features=str(features), out=str(tmp_path / "rec"), llm_mode="none", max_examples=40,
                            epochs=1, batch_size=8, num_workers=2, size=SIZE))
    info = json.loads((tmp_path / "rec" / "train.json").read_text())
    assert info["rec_video_loss"] > 0 and info["rec_comment_loss"] > 0 and info["examples"] == 80
    assert info["seq_sup_loss"] == info["vc_loss"] == info["lm_loss"] == 0.0
    assert not (tmp_path / "rec" / "llm").exists() and load_model(out)[0] == "sr"
