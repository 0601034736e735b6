import dataclasses

import numpy as np
import pytest
import torch

from core.contract import TASKS
from features.folder import FeaturesFolder
from trainers.align import AlignConfig, llm_config, save_aligned, stage1_losses, stage1_sr, total_loss
from trainers.checkpoint import load_init_weights
from trainers.data import collate, item_time_tensors, text_tensors
from trainers.finetune import FinetuneConfig, model_config
from trainers.item_alignment import text_item_tables
from trainers.models import ModelSize, build_model
from trainers.models.llm import VIDEO_HEADER, VIDEO_TASK, ItemTexts, LLMRecommender, load_base

SIZE = ModelSize(hidden=16, num_heads=2, inner=32, num_layers=1, max_history=8, dropout=0.0)


def first_rows(features, task, n=6):
    return next(FeaturesFolder(features).iter_examples(task, "train", batch_size=n))


def setup(fake_features, tiny_llm, tmp_path, **overrides):
    config = AlignConfig(features=str(fake_features), out=str(tmp_path), llm=str(tiny_llm), llm_mode="lora",
                         max_prompt_tokens=128, size=SIZE, **overrides)
    torch.manual_seed(0)
    sr = stage1_sr(config, FeaturesFolder(fake_features))
    base, tokenizer = load_base(str(tiny_llm))
    llm = LLMRecommender(base, tokenizer, llm_config(config))
    return config, sr, llm


def test_config_validation_and_auto_mode():
    assert AlignConfig(features="f", out="o").mode == "frozen"
    assert AlignConfig(features="f", out="o", use_gpu=True).mode == "lora"
    with pytest.raises(ValueError, match="llm_mode"):
        AlignConfig(features="f", out="o", llm_mode="full")


def test_gradient_flow_lora_sr_and_adapters_base_frozen(fake_features, tiny_llm, tmp_path):
    config, sr, llm = setup(fake_features, tiny_llm, tmp_path)
    batches = {task: first_rows(fake_features, task) for task in TASKS}
    losses = stage1_losses(sr, llm, batches, config, ItemTexts.from_folder(FeaturesFolder(fake_features)), torch.device("cpu"))
    losses.pop("tokens")
    assert set(losses) == {"lm", "rec_video", "rec_comment", "seq_sup", "vc"}
    assert all(torch.isfinite(v) for v in losses.values())
    total_loss(losses, config).backward()
    for name in ("video_adapter.weight", "comment_adapter.weight", "pool_proj.weight", "context_mlp.0.weight",
                 "video_encoder.blocks.0.attn.q.weight", "comment_encoder.blocks.0.attn.q.weight"):
        assert dict(sr.named_parameters())[name].grad.abs().sum() > 0, name
    params = dict(llm.named_parameters())
    lora_b = [n for n in params if "lora_B" in n]
    assert lora_b and all(params[n].grad.abs().sum() > 0 for n in lora_b)  # B starts at 0, so A's grad is 0
    assert params["adapter.weight"].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in params.items() if "lora_" not in n and not n.startswith("adapter."))


def test_without_vc_contrast_the_term_is_absent(fake_features, tiny_llm, tmp_path):
    config, sr, llm = setup(fake_features, tiny_llm, tmp_path, vc_contrast=False)
    batches = {"video": first_rows(fake_features, "video"), "comment": None}
    losses = stage1_losses(sr, llm, batches, config, ItemTexts.from_folder(FeaturesFolder(fake_features)), torch.device("cpu"))
    assert "vc" not in losses and losses["rec_comment"].item() == 0.0


def test_frozen_mode_trains_only_the_adapter_on_precomputed_states(fake_features, tmp_path):
    config = AlignConfig(features=str(fake_features), out=str(tmp_path), llm_mode="frozen", size=SIZE)
    sr = stage1_sr(config, FeaturesFolder(fake_features))
    adapter = torch.nn.Linear(24, 16)
    rows = first_rows(fake_features, "video")
    rows["llm_state"] = np.random.default_rng(0).normal(size=(len(rows["target"]), 24)).astype(np.float32)
    losses = stage1_losses(sr, adapter, {"video": rows}, config, None, torch.device("cpu"))
    assert "lm" not in losses
    total_loss(losses, config).backward()
    assert adapter.weight.grad.abs().sum() > 0


def test_stage2_init_reproduces_stage1_outputs_exactly(fake_features, tiny_llm, tmp_path):
    config, sr, llm = setup(fake_features, tiny_llm, tmp_path)
    with torch.no_grad():  # move the weights away from their initial values
        for p in sr.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_aligned(tmp_path / "aligned", sr, llm, config, {})
    assert (tmp_path / "aligned" / "llm" / "lora" / "adapter_config.json").is_file()
    video_text, comment_text = text_tensors(FeaturesFolder(fake_features))
    ft = FinetuneConfig(features=str(fake_features), out="unused", init=str(tmp_path / "aligned"), size=SIZE)
    for text_only in (False, True):
        cfg = model_config(dataclasses.replace(ft, text_only=text_only), video_text.shape[0],
                           comment_text.shape[0], video_text.shape[1])
        stage2 = build_model("sr", dataclasses.asdict(cfg))
        stage2.set_seen(torch.ones(video_text.shape[0], dtype=torch.bool),
                        torch.ones(comment_text.shape[0], dtype=torch.bool))
        fresh = load_init_weights(stage2, tmp_path / "aligned")
        if "video_id.weight" in fresh:
            stage2.zero_id_embeddings()  # as trainers/finetune.py does
        stage2.set_text_tables(video_text, comment_text)
        stage2.set_item_times(*item_time_tensors(FeaturesFolder(fake_features)))
        sr.eval()
        stage2.eval()
        for task in TASKS:
            batch = collate(first_rows(fake_features, task), 8)
            if task == "video":
                expected, got = sr.user_video_vector(batch), stage2.user_video_vector(batch)
                items = torch.arange(10)
                assert torch.equal(sr.video_item_vectors(items, batch["ts"][0]), stage2.video_item_vectors(items, batch["ts"][0]))
            else:
                expected = sr.comment_context_vector(batch, batch["query_video"])
                got = stage2.comment_context_vector(batch, batch["query_video"])
            assert torch.equal(expected, got), (task, text_only)


def test_vc_contrast_reads_both_heads_and_the_llm_side_is_centred_per_task(fake_features, tiny_llm, tmp_path):
    """The video-comment contrast is computed on the task heads' own user vectors (the comment head's
    context MLP gets its gradient even from video rows), and a constant shift of every LLM state of a task
    (an instruction line) changes nothing: lora-mode preferences are centred per task."""
    config, sr, llm = setup(fake_features, tiny_llm, tmp_path, rec_weight=0.0)
    texts = ItemTexts.from_folder(FeaturesFolder(fake_features))
    batches = {"video": first_rows(fake_features, "video"), "comment": None}
    llm.eval()
    losses = stage1_losses(sr, llm, batches, config, texts, torch.device("cpu"))
    losses["vc"].backward()
    assert sr.context_mlp[0].weight.grad.abs().sum() > 0  # the comment head, on video-task rows
    with torch.no_grad():
        llm.adapter.bias.add_(5.0)  # the same shift for every example of the task
    shifted = stage1_losses(sr, llm, batches, config, texts, torch.device("cpu"))
    assert shifted["vc"].item() == pytest.approx(losses["vc"].item(), rel=1e-5)
    assert shifted["seq_sup"].item() == pytest.approx(losses["seq_sup"].item(), rel=1e-5)


def test_fast_precompute_matches_float32(tmp_path):
    """The bfloat16 LLM states of the precompute (length-grouped forwards) against float32 in one batch, on
    the packaged SmolLM2 and prompts of several lengths: cosine >= 0.99 per prompt, rows in their order."""
    from trainers.align import last_prompt_states
    from trainers.models.llm import LLMConfig

    prompts = [VIDEO_HEADER + "\n" + "\n".join(f"- watched \"clip {i} about topic {i % 7}\"" for i in range(n))
               + "\n" + VIDEO_TASK for n in (1, 9, 3, 20, 5)]
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        base, tokenizer = load_base("default", dtype=dtype)
        llm = LLMRecommender(base, tokenizer, LLMConfig(frozen=True, max_prompt_tokens=256)).eval()
        with torch.no_grad():
            got[dtype], tokens = last_prompt_states(llm, prompts, forward_rows=2 if dtype == torch.bfloat16 else 5)
    assert list(tokens) == [min(llm.count_tokens(p), 256) for p in prompts]  # encode keeps the last 256
    cosine = (got[torch.float32] * got[torch.bfloat16]).sum(1) / (
        np.linalg.norm(got[torch.float32], axis=1) * np.linalg.norm(got[torch.bfloat16], axis=1))
    assert cosine.min() >= 0.99, cosine


def test_item_contrast_aligns_the_text_adapters_with_the_llm_item_vectors(fake_features, tmp_path):
    """item_tables add the item contrast: it reaches both SR text adapters and the LLM-side adapter, and it
    is low when the adapted SR item vectors already are the LLM's."""
    config = AlignConfig(features=str(fake_features), out=str(tmp_path), llm_mode="frozen", size=SIZE,
                         item_contrast=True)
    folder = FeaturesFolder(fake_features)
    sr = stage1_sr(config, folder)
    adapter = torch.nn.Linear(24, 16)
    video_text, comment_text = text_tensors(folder)
    rng = np.random.default_rng(0)
    tables = {"video": torch.from_numpy(rng.normal(size=(len(video_text), 24)).astype(np.float32)),
              "comment": torch.from_numpy(rng.normal(size=(len(comment_text), 24)).astype(np.float32))}
    batches = {task: first_rows(fake_features, task) for task in TASKS}
    for rows in batches.values():
        rows["llm_state"] = rng.normal(size=(len(rows["target"]), 24)).astype(np.float32)
    losses = stage1_losses(sr, adapter, batches, config, None, torch.device("cpu"), tables)
    losses["item"].backward()
    for name in ("video_adapter.weight", "comment_adapter.weight"):
        assert dict(sr.named_parameters())[name].grad.abs().sum() > 0, name
    assert adapter.weight.grad.abs().sum() > 0
    # LLM item vectors that are the SR's own (through an identity adapter): the contrast is near its floor.
    identity = torch.nn.Linear(16, 16)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(16))
        identity.bias.zero_()
        own = {"video": sr.timeless_item_vectors("video", torch.arange(len(video_text))),
               "comment": sr.timeless_item_vectors("comment", torch.arange(len(comment_text)))}
        matched = stage1_losses(sr, identity, {t: {**r, "llm_state": np.zeros((len(r["target"]), 16), np.float32)}
                                               for t, r in batches.items()}, config, None, torch.device("cpu"), own)
    assert matched["item"].item() < losses["item"].item()


def test_without_an_llm_the_item_contrast_targets_the_features_own_text_vectors(fake_features, tmp_path):
    """llm_mode none with item_contrast (sr_rec_item_pretrain): the target is the centred text tables through
    an adapter of its own; both it and the SR's text adapters get gradients, and no LLM loss appears."""
    config = AlignConfig(features=str(fake_features), out=str(tmp_path), llm_mode="none", size=SIZE,
                         item_contrast=True)
    folder = FeaturesFolder(fake_features)
    sr = stage1_sr(config, folder)
    tables = text_item_tables(folder)
    video_text, _ = text_tensors(folder)
    assert torch.allclose(tables["video"], video_text - video_text.mean(0))
    assert tables["video"].mean(0).abs().max() < 1e-5  # centred per kind
    adapter = torch.nn.Linear(32, 16)
    batches = {task: first_rows(fake_features, task) for task in TASKS}
    losses = stage1_losses(sr, None, batches, config, None, torch.device("cpu"), tables, adapter)
    assert set(losses) == {"rec_video", "rec_comment", "item"}
    losses["item"].backward()
    assert adapter.weight.grad.abs().sum() > 0
    assert dict(sr.named_parameters())["video_adapter.weight"].grad.abs().sum() > 0
    plain = stage1_losses(sr, None, batches, config, None, torch.device("cpu"))  # no tables: the rec losses alone
    assert set(plain) == {"rec_video", "rec_comment"}
