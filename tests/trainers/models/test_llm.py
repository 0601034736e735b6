import numpy as np
import pytest
import torch

import trainers.models.llm as llm_module
from trainers.models.llm import (
    ItemTexts,
    LLMConfig,
    LLMRecommender,
    fit_prompt,
    history_lines,
    load_base,
    render_examples,
    resolve_llm_path,
)

TEXTS = ItemTexts(videos=["cats", "dogs", "birds"], comments=["so cute", "lol", "wow", "nice"])


def make_llm(tiny_llm, **overrides) -> LLMRecommender:
    base, tokenizer = load_base(str(tiny_llm))
    return LLMRecommender(base, tokenizer, LLMConfig(sr_hidden=16, **overrides))


def test_history_lines_render_titles_hot_comments_and_interactions():
    row = {"hist_video": [0, 2], "hist_video_hot": [1, -1], "hist_cmt_video": [1],
           "hist_cmt_comments": [0, 3, -1]}
    videos, comments = history_lines(row, TEXTS)
    assert videos == ['- watched "cats" (top comment: "lol")', '- watched "birds"']
    assert comments == ['- under "dogs" engaged with "so cute", "nice"']


def test_truncation_keeps_the_newest_lines():
    lines = [f"- watched item{i}" for i in range(10)]
    # The frame is 19 words and each line 3: 7 lines fit in 40 words, and they must be the newest 7.
    prompt = fit_prompt(lines, [], "Task", lambda text: len(text.split()), max_tokens=40)
    assert len(prompt.split()) == 40
    assert [i for i in range(10) if f"item{i}" in prompt] == list(range(3, 10))


def test_render_examples_video_and_comment_tasks():
    rows = {"hist_video": [np.array([0])], "hist_video_hot": [np.array([-1])], "hist_cmt_video": [np.array([])],
            "hist_cmt_comments": [np.array([])], "target": np.array([1]), "query_video": np.array([2])}
    prompts, responses = render_examples(rows, "video", TEXTS, lambda t: len(t.split()), 200)
    assert "recommend the next video" in prompts[0] and '"cats"' in prompts[0] and responses == [" dogs"]
    prompts, responses = render_examples(rows, "comment", TEXTS, lambda t: len(t.split()), 200)
    assert 'watching the video "birds"' in prompts[0] and responses == [" lol"]
    with pytest.raises(ValueError):
        render_examples(rows, "music", TEXTS, len, 10)


def test_encode_masks_prompt_and_padding_in_labels(tiny_llm):
    llm = make_llm(tiny_llm)
    enc = llm.encode(["recommend the next video", "task"], [" 5 6", " 7"])
    # Row 0: 4 prompt tokens + 2 response + EOS; row 1: 1 + 1 + EOS, padded to 7.
    assert enc["input_ids"].shape == (2, 7)
    assert enc["last_prompt"].tolist() == [3, 0]
    assert enc["labels"][0].tolist() == [-100] * 4 + enc["input_ids"][0, 4:].tolist()
    assert enc["labels"][1].tolist() == [-100, enc["input_ids"][1, 1].item(), 2, -100, -100, -100, -100]
    assert enc["attention_mask"].sum(1).tolist() == [7, 3]


def test_forward_shapes_and_preference_ignores_the_response(tiny_llm):
    llm = make_llm(tiny_llm).eval()
    out = llm(llm.encode(["recommend the next video", "task"], [" 5 6", " 7"]))
    assert out["preference"].shape == (2, 16) and out["lm_loss"].ndim == 0
    # The causal LM's state at the last prompt token cannot see the response (nor padding).
    other = llm(llm.encode(["recommend the next video", "task"], [" 9", " 8 8 8"]))
    torch.testing.assert_close(out["preference"], other["preference"], atol=1e-5, rtol=1e-5)


def test_lora_on_attention_projections_base_frozen(tiny_llm):
    llm = make_llm(tiny_llm)
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("adapter.") for n in trainable)
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert lora_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    frozen = make_llm(tiny_llm, frozen=True)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["adapter.weight", "adapter.bias"]


def test_save_adapter_writes_peft_and_preference_files(tiny_llm, tmp_path):
    llm = make_llm(tiny_llm)
    llm.save_adapter(tmp_path)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "preference_adapter.safetensors").is_file()


def test_unknown_llm_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_llm_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_llm_path(str(tmp_path / "missing.gguf"))


def test_a_gguf_file_is_converted_like_the_packaged_one(tmp_path, monkeypatch):
    gguf = tmp_path / "copy.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(llm_module, "converted_gguf", lambda path=None: calls.append(path) or tmp_path / "hf")
    assert resolve_llm_path(str(gguf)) == tmp_path / "hf"
    assert calls == [gguf]


def test_frozen_states_skip_the_lm_head_but_equal_the_full_models_last_hidden_state(tiny_llm):
    base, tokenizer = load_base(str(tiny_llm))
    frozen = LLMRecommender(base, tokenizer, LLMConfig(sr_hidden=16, frozen=True)).eval()
    enc = frozen.encode(["recommend the next video", "a longer task prompt here"])
    with torch.no_grad():
        last, loss = frozen.hidden(enc)
        full = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    expected = full.hidden_states[-1][torch.arange(2), enc["last_prompt"]]
    assert loss is None
    torch.testing.assert_close(last, expected, atol=1e-6, rtol=1e-6)


def test_inference_dtype_is_explicit_or_auto():
    from trainers.models.llm import inference_dtype

    assert inference_dtype("float32") == torch.float32 and inference_dtype("bfloat16") == torch.bfloat16
    assert inference_dtype("auto", "cuda:0") == torch.bfloat16
    assert inference_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        inference_dtype("float16")
