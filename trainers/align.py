"""Stage 1, personalized preference alignment, on Ray Train (DESIGN.md section 6).

    ckpt = align(AlignConfig(features="FEATURES", out="ALIGNED"))
    lsvcr train align features=FEATURES out=ALIGNED [llm=default|HF_FOLDER] [llm_mode=auto|lora|frozen]

Each worker streams its shard of examples/video/train and examples/comment/train (Ray Data, not materialised
on the driver); every step takes one batch of each task, so the LLM sees video and comment instructions
mixed in one forward pass. Loss = LM (response tokens only; LoRA mode) + rec_weight x (video + comment
InfoNCE of the task head's user vector against the target's text vector) + contrast_weight x (sequential-
supplemental contrast both ways + video-comment preference contrast on both heads' vectors). Every InfoNCE
gathers its negatives from all workers (trainers/losses.py). The examples are shuffled globally (the files are
grouped by user) and another example of the same user is no negative of the sequential-supplemental contrast.
The LLM side is centred per task (frozen: each task's mean state, kept in llm/state_means.safetensors; lora: the
batch's), so the instruction line alone cannot solve the video-comment contrast. The SR model is text-only here;
stage 2 (trainers/finetune.py, `init=ALIGNED`) adds the gated ID embeddings. `AlignRecipe` is the stage on
the shared Ray Train mechanics of trainers/loop.py.

llm_mode:
- `lora`: the LLM (+ LoRA r 8, alpha 32, dropout 0.1 on the attention projections) runs in every step;
- `frozen`: the base LLM's last-prompt-token states are precomputed once with Ray Data batch inference for a
  seeded random sample of `max_examples` train examples per task (under CACHE/llm_states/, keyed by the LLM,
  dtype, prompts and train files; bfloat16 where the CPU has it) and only the preference adapter is trained on
  the LLM side: the cheap option on CPU;
- `none`: no LLM, the rec losses alone (the `sr_rec_pretrain` control of lsvcr/suite.py); with
  `item_contrast`, also the item contrast against the features' own text vectors (`sr_rec_item_pretrain`);
- `auto` (default): lora with use_gpu, frozen without.

Checkpoints (every `checkpoint_every` steps and at the end): the SR model as model.safetensors + config.json
(docs/DATA.md section 4, loadable by stage 2), llm/lora (PEFT save_pretrained) and
llm/preference_adapter.safetensors, optimizer.safetensors (AdamW moments), state.json (step, epoch, per-epoch
history); train.json holds the last metrics and the per-epoch `history`. With `export_item_tables` (LoRA),
OUT/features is the features folder with the aligned LLM's item tables, which stage 2 then reads. After a
worker failure Ray Train restarts the workers (FailureConfig(max_failures)) and they resume from the last
checkpoint's weights, optimizer state and step count; the interrupted epoch is read again from its start.
`fail_once_at_step` injects one such failure (tests only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.config import require, require_at_least
from core.contract import TASKS
from core.paths import cache_dir
from core.runtime import init_ray
from features.embeddings import HF_PREFIX, LORA_PREFIX
from features.folder import FeaturesFolder
from features.reembed import reembed
from trainers.checkpoint import CONFIG, TRAIN, WEIGHTS, load_state, read_weights, save_checkpoint, write_tensors
from trainers.data import collate, item_time_tensors, text_tensors
from trainers.item_alignment import item_contrast, llm_item_tables, load_item_tables, text_item_tables
from trainers.loop import (
    OPTIMIZER,
    STATE,
    Recipe,
    all_reduce,
    any_worker,
    read_training_state,
    restored,
    train_counts,
    write_training_state,
)
from trainers.losses import info_nce, item_vectors, seq_sup_contrast, vc_contrast
from trainers.models.base import ModelSize
from trainers.models.llm import (
    DEFAULT_LLM,
    ItemTexts,
    LLMConfig,
    LLMRecommender,
    inference_dtype,
    load_base,
    render_examples,
    resolve_llm_path,
)
from trainers.models.sr import SRConfig, SRModel

LLM_MODES = ("auto", "lora", "frozen", "none")
STATE_COLUMN = "llm_state"
LLM_DIR, TRAINABLE = "llm", "trainable.safetensors"  # everything trained on the LLM side, for resuming
STATE_MEANS = "state_means.safetensors"  # frozen mode: each task's mean LLM state, subtracted before the adapter
ITEM_ADAPTER = "item_adapter.safetensors"  # llm_mode none with item_contrast: the text target's adapter
ALIGNED_FEATURES = "features"  # export_item_tables: the features with the aligned LLM's item tables
LOSS_NAMES = ("total", "lm", "rec_video", "rec_comment", "seq_sup", "vc", "item")


@dataclass
class AlignConfig:
    features: str  # features folder: a path (shared storage on a cluster) or a URI (copied once per node)
    out: str
    llm: str = DEFAULT_LLM  # "default" (packaged SmolLM2-135M-Instruct) or a local HF checkpoint folder
    llm_mode: str = "auto"
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs)
    max_examples: int = 0  # a seeded random sample of train examples per task (0 = all); the LLM is the cost on CPU
    batch_size: int = 16  # per worker and task
    lr: float = 3e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 5.0
    rec_weight: float = 1.0
    contrast_weight: float = 0.5
    vc_contrast: bool = True  # False = the lsvcr_no_vc_contrast ablation
    # The item-level contrast of trainers/item_alignment.py (the minilm_aligned item encoder): the SR's text
    # adapters against the LLM's item vectors, weighted like the other contrasts. With llm_mode none, against
    # the features' own text vectors through an adapter of its own (the control without the LLM).
    item_contrast: bool = False
    # Item-age and history-gap embeddings and the freshness score (SRConfig.time_features and freshness)
    time_features: bool = True
    max_prompt_tokens: int = 384
    max_response_tokens: int = 32
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    shuffle_buffer: int = 256
    log_every: int = 10
    checkpoint_every: int = 200  # steps between checkpoints (also written at the end)
    max_failures: int = 1  # worker failures Ray Train recovers from
    fail_once_at_step: int = 0  # tests only: rank 0 raises once after this step (0 = never)
    storage_path: Optional[str] = None
    inference_batch_size: int = 256  # frozen mode: examples per Ray batch of the precompute (forwards: FORWARD_ROWS)
    llm_dtype: str = "auto"  # frozen precompute: auto (bfloat16 on GPU or bf16-capable CPUs), float32 or bfloat16
    # After a LoRA stage 1, re-embed the features' titles and comments with the aligned LLM into OUT/features
    # (export_item_tables), the folder stage 2 and serving then read, as the official code re-exports its item
    # tables. The features must hold the base LLM's own tables (encoder=llm for the packaged SmolLM2, or
    # hf:<llm>): the SR's text adapters were trained over them.
    export_item_tables: bool = False
    # Randomized sorted position ids: the official code aligns on shorter histories (20) than it fine-tunes on
    # (50); here both stages read size.max_history, so positions stay as stage 2 sees them unless asked.
    random_positions: bool = False
    size: ModelSize = field(default_factory=ModelSize)  # the SR model's; stage 2 must use the same

    def __post_init__(self):
        require(self, bool(self.features), "features", "is required")
        require(self, bool(self.out), "out", "is required")
        require(self, self.llm_mode in LLM_MODES, "llm_mode", f"must be one of {LLM_MODES}")
        require_at_least(self, 1, "epochs", "batch_size", "num_workers", "log_every", "checkpoint_every",
                         "max_prompt_tokens", "max_response_tokens", "inference_batch_size")
        require_at_least(self, 0, "max_steps", "max_examples", "weight_decay", "max_grad_norm", "rec_weight",
                         "contrast_weight", "shuffle_buffer", "max_failures", "fail_once_at_step")
        require(self, self.lr > 0, "lr", "must be > 0")
        require(self, self.llm_dtype in ("auto", "float32", "bfloat16"), "llm_dtype",
                "must be auto, float32 or bfloat16")

    @property
    def mode(self) -> str:
        if self.llm_mode == "auto":
            return "lora" if self.use_gpu else "frozen"
        return self.llm_mode


def sr_config(config: AlignConfig, text_dim: int) -> SRConfig:
    return SRConfig(text_dim=text_dim, size=config.size, use_id_embedding=False,
                    random_positions=config.random_positions,
                    time_features=config.time_features, freshness=config.time_features, history_match=True)


def stage1_sr(config: AlignConfig, folder: FeaturesFolder) -> SRModel:
    """Stage 1's SR model on the folder's item text tables and publication times (on the CPU)."""
    sr = SRModel(sr_config(config, folder.text_dim))
    sr.set_text_tables(*text_tensors(folder))
    sr.set_item_times(*item_time_tensors(folder))  # a no-op without time features
    return sr


def llm_config(config: AlignConfig) -> LLMConfig:
    return LLMConfig(sr_hidden=config.size.hidden, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                     lora_dropout=config.lora_dropout, frozen=config.mode == "frozen",
                     max_prompt_tokens=config.max_prompt_tokens, max_response_tokens=config.max_response_tokens)


# ---- one step (pure torch: used by the Ray Train loop and by the tests) ---------------------------------


def user_keys(user_ids) -> torch.Tensor:
    """[n] int64 keys of user ids (strings), equal on every worker (crc32, not Python's salted hash)."""
    return torch.tensor([zlib.crc32(str(u).encode()) for u in user_ids], dtype=torch.long)


def stage1_losses(sr: SRModel, llm, batches: dict[str, dict | None], config: AlignConfig, texts: ItemTexts,
                  device: torch.device, item_tables: dict[str, torch.Tensor] | None = None,
                  item_adapter: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Losses of one step. batches maps task -> example rows (numpy batch; frozen mode: with the
    llm_state column, already centred per task) or None. `llm` is an LLMRecommender (lora), the preference
    adapter nn.Linear (frozen) or None (llm_mode none: the rec losses alone). item_tables (kind -> the LLM's
    item vectors, trainers/item_alignment.py) adds the item contrast, through the LLM side's preference adapter;
    without an LLM, item_tables are the features' own text vectors and go through `item_adapter` (the
    sr_rec_item_pretrain control). Every worker calls the same collectives whatever its batches hold (empty
    tensors stand in)."""
    h, temperature = config.size.hidden, config.size.temperature
    users, heads, is_video, keys, losses = [], {"video_head": [], "comment_head": []}, [], [], {}
    targets = {task: torch.zeros(0, dtype=torch.long, device=device) for task in TASKS}
    prompts, responses, states, prefs = [], [], [], []
    for task in TASKS:
        rows = batches.get(task)
        if rows is None or len(rows["target"]) == 0:
            # An empty stand-in keeps the collectives of info_nce in step with the other workers.
            losses[f"rec_{task}"] = info_nce(torch.zeros(0, h, device=device), torch.zeros(0, h, device=device),
                                             temperature, torch.zeros(0, dtype=torch.long, device=device))
            continue
        batch = {k: v.to(device) for k, v in collate(rows, config.size.max_history).items()}
        out = sr.stage1_vectors(batch, batch["query_video"] if task == "comment" else None)
        user = out[f"{task}_head"]
        items = item_vectors(sr, task, batch["target"], batch.get("ts"))
        losses[f"rec_{task}"] = info_nce(user, items, temperature, batch["target"])
        targets[task] = batch["target"]
        users.append(user)
        for name in heads:
            heads[name].append(out[name])
        is_video.append(torch.full((len(items),), task == "video", device=device))
        keys.append(user_keys(rows["user_id"]).to(device))
        if config.mode == "frozen":
            states.append(torch.from_numpy(np.stack(list(rows[STATE_COLUMN])).astype(np.float32)))
        elif config.mode == "lora":
            p, r = render_examples(rows, task, texts, llm.count_tokens, config.max_prompt_tokens)
            prompts.append(p)
            responses += r
    if item_tables is not None:
        adapter = item_adapter if llm is None else llm if config.mode == "frozen" else llm.adapter
        losses["item"] = sum(item_contrast(sr, adapter, task, targets[task], item_tables[task], temperature)
                             for task in TASKS) / len(TASKS)
    if llm is None:
        return losses
    if config.mode == "frozen" and states:
        prefs = [llm(torch.cat(states).to(device))]
    elif prompts:
        enc = {k: v.to(device) for k, v in llm.encode(sum(prompts, []), responses).items()}
        out = llm(enc)  # video and comment instructions in one forward
        if out["lm_loss"] is not None:
            losses["lm"] = out["lm_loss"]
        losses["tokens"] = enc["attention_mask"].sum().detach().float()
        # Centred per task, as the frozen states are (precompute_states): the instruction line alone must
        # not tell the tasks apart. The adapter is linear, so centring its output centres the LLM states.
        prefs = [part - part.mean(0, keepdim=True) for part in out["preference"].split([len(p) for p in prompts])]
    if users:
        user, is_video, keys = torch.cat(users), torch.cat(is_video), torch.cat(keys)
        video_head, comment_head = torch.cat(heads["video_head"]), torch.cat(heads["comment_head"])
        prefs = torch.nn.functional.normalize(torch.cat(prefs), dim=-1)
    else:
        user = video_head = comment_head = prefs = torch.zeros(0, h, device=device)
        is_video = torch.zeros(0, dtype=torch.bool, device=device)
        keys = torch.zeros(0, dtype=torch.long, device=device)
    losses["seq_sup"] = seq_sup_contrast(user, prefs, temperature, keys)
    if config.vc_contrast:
        losses["vc"] = vc_contrast(prefs, video_head, comment_head, is_video, temperature)
    return losses


def total_loss(losses: dict[str, torch.Tensor], config: AlignConfig) -> torch.Tensor:
    """LM + rec_weight x rec + contrast_weight x contrast (the terms that are there)."""
    rec = losses["rec_video"] + losses["rec_comment"]
    contrast = losses.get("seq_sup", 0.0) + losses.get("vc", 0.0) + losses.get("item", 0.0)
    return losses.get("lm", 0.0) + config.rec_weight * rec + config.contrast_weight * contrast


# ---- frozen mode: the LLM states, precomputed once with Ray Data batch inference ---------------------------

FORWARD_ROWS = 32  # prompts per LLM forward in the precompute, grouped by length (bfloat16 GEMMs want width)


class _LLMStates:
    """Ray Data batch inference (frozen mode): example rows -> + llm_state (the base LLM's final hidden
    state at the last prompt token) and llm_tokens. Prompts are sorted by length and run FORWARD_ROWS at a time,
    so each forward pads to a near-equal length; rows keep their order."""

    def __init__(self, llm_path: str, task: str, folder: FeaturesFolder, max_prompt_tokens: int,
                 dtype: str = "auto"):
        folder = folder.on_this_node()
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        base, tokenizer = load_base(llm_path, dtype=inference_dtype(dtype))
        self.llm = LLMRecommender(base, tokenizer, LLMConfig(frozen=True, max_prompt_tokens=max_prompt_tokens))
        self.llm.eval()
        self.task, self.texts, self.max_prompt_tokens = task, ItemTexts.from_folder(folder), max_prompt_tokens
        self.done, self.started = 0, time.monotonic()

    @torch.no_grad()
    def __call__(self, rows: dict) -> dict:
        prompts, _ = render_examples(rows, self.task, self.texts, self.llm.count_tokens, self.max_prompt_tokens)
        rows[STATE_COLUMN], rows["llm_tokens"] = last_prompt_states(self.llm, prompts)
        self.done += len(prompts)
        print(f"align: LLM states: {self.done} {self.task} examples in {time.monotonic() - self.started:.0f}s",
              flush=True)
        return rows


def last_prompt_states(llm: LLMRecommender, prompts: list[str], forward_rows: int = FORWARD_ROWS
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(final hidden state at each prompt's last token, float32 [n, llm_hidden]; prompt tokens [n]), in the
    order of `prompts`, from forwards of up to forward_rows prompts of similar length."""
    tokens = np.array([min(llm.count_tokens(p), llm.config.max_prompt_tokens) for p in prompts], dtype=np.int64)
    states = np.zeros((len(prompts), llm.llm_hidden), np.float32)
    order = np.argsort(tokens, kind="stable")
    for start in range(0, len(order), forward_rows):
        rows = order[start: start + forward_rows]
        last, _ = llm.hidden(llm.encode([prompts[i] for i in rows]))  # [b, llm_hidden]
        states[rows] = last.float().numpy()
    return states, tokens


PROMPT_COLUMNS = ("event_id", "target", "query_video", "hist_video", "hist_video_hot", "hist_cmt_video",
                  "hist_cmt_comments")  # what a prompt is rendered from (with the item texts)


def content_digest(folder: FeaturesFolder, task: str, split: str) -> str:
    """sha256 of what the prompts of a task and split are rendered from: the examples' prompt columns (sorted
    by event id, so a rebuild that writes other files in another order gives the same digest) and the item
    texts."""
    import pyarrow as pa

    table = folder.examples_table(task, split)
    table = table.select([c for c in PROMPT_COLUMNS if c in table.column_names]).sort_by("event_id")
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    digest.update(sink.getvalue().to_pybytes())
    texts = ItemTexts.from_folder(folder)
    for values in (texts.videos, texts.comments):
        digest.update("\x1f".join(str(v) for v in values).encode())
    return digest.hexdigest()


def states_key(config: AlignConfig, folder: FeaturesFolder, llm_path: str, task: str, split: str = "train") -> dict:
    """What the LLM states of a task and split depend on: the LLM, the prompt budget, the dtype actually used,
    the sample and the content the prompts come from (content_digest: a rebuilt features folder with the same
    examples reuses them, a changed one does not). The stage 1 seed is not part of it: every seed reads the
    same sample."""
    return {"llm": str(llm_path), "max_prompt_tokens": config.max_prompt_tokens,
            "dtype": str(inference_dtype(config.llm_dtype)), "max_examples": config.max_examples,
            "sample_seed": SAMPLE_SEED, "task": task, "split": split,
            "content": content_digest(folder, task, split)}


SAMPLE_SEED = 0  # the random sample of examples that get LLM states (shared by every stage 1 seed)
MEAN_FILE = "mean.npy"  # next to the states: their mean, the task's centre


def sample_event_ids(folder: FeaturesFolder, task: str, split: str, n: int) -> set[str] | None:
    """A seeded random sample of n example event ids of a task and split (None: n is 0 or covers them all).
    A random sample, not the first rows: the files are grouped by user."""
    event_ids = folder.examples_table(task, split, ["event_id"])["event_id"].to_numpy(zero_copy_only=False)
    if not n or n >= len(event_ids):
        return None
    rng = np.random.default_rng(SAMPLE_SEED)
    return set(event_ids[rng.choice(len(event_ids), n, replace=False)].tolist())


def _keep_events(rows: dict, event_ids: set[str]) -> dict:
    keep = np.array([e in event_ids for e in rows["event_id"]], dtype=bool)
    return {k: v[keep] for k, v in rows.items()}


def _centre(rows: dict, mean: np.ndarray) -> dict:
    rows[STATE_COLUMN] = np.stack(list(rows[STATE_COLUMN])).astype(np.float32) - mean
    return rows


def precompute_states(config: AlignConfig, folder: FeaturesFolder, llm_path: str, tasks: list[str], root: Path,
                      fresh: bool = False, split: str = "train") -> dict[str, str]:
    """Frozen mode: write examples + llm_state per task under root/llm_states/<hash of states_key>/<task>
    (and their mean, MEAN_FILE), for a seeded random sample of config.max_examples examples of the split (all
    when 0), reused by every later run with the same key (the seeds of a suite share one precompute).
    fresh=True computes them again even when they are there (the train benchmark times this)."""
    import ray.data

    folders = {}
    for task in tasks:
        key = json.loads(json.dumps(states_key(config, folder, llm_path, task, split)))  # tuples -> lists
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        states = root / "llm_states" / digest / task
        marker = states / "_done.json"
        if fresh or not (marker.is_file() and json.loads(marker.read_text()) == key):
            shutil.rmtree(states, ignore_errors=True)
            started = time.monotonic()
            path, filesystem = folder.examples_source(task, split)
            dataset = ray.data.read_parquet(path, filesystem=filesystem)
            sample = sample_event_ids(folder, task, split, config.max_examples)
            if sample is not None:
                dataset = dataset.map_batches(_keep_events, fn_kwargs={"event_ids": sample}, batch_format="numpy")
            rows = len(sample) if sample is not None else folder.count_examples(task, split)
            # One block per inference batch: each finished batch is an output (progress, and Ray Data's
            # no-progress timeout of 30 minutes never sees a whole split's states held back as one block).
            dataset = dataset.repartition(max(1, -(-rows // config.inference_batch_size)))
            dataset = dataset.map_batches(
                _LLMStates, fn_constructor_kwargs={"llm_path": str(llm_path), "task": task, "folder": folder,
                                                   "max_prompt_tokens": config.max_prompt_tokens,
                                                   "dtype": config.llm_dtype},
                batch_size=config.inference_batch_size, batch_format="numpy", concurrency=1)
            dataset.write_parquet(str(states))
            written = read_states(states, [STATE_COLUMN, "llm_tokens"])
            np.save(states / MEAN_FILE, np.asarray(written[STATE_COLUMN], np.float32).mean(0))
            marker.write_text(json.dumps(key))
            elapsed = time.monotonic() - started
            print(f"align: LLM states for {len(written['llm_tokens'])} {task}/{split} examples in {elapsed:.1f}s "
                  f"({int(written['llm_tokens'].sum()) / max(elapsed, 1e-9):.0f} prompt tokens/s)", flush=True)
        folders[task] = str(states)
    return folders


def read_states(folder: str | Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """A states folder of precompute_states as one numpy batch, read through Ray Data as training reads it (Ray
    wrote the list columns as its own tensor types, which plain pyarrow hands back as structs)."""
    import ray.data

    dataset = ray.data.read_parquet(str(folder))
    if columns:
        dataset = dataset.select_columns(columns)
    return dataset.take_batch(batch_size=dataset.count(), batch_format="numpy")


def state_means(folders: dict[str, str]) -> dict[str, np.ndarray]:
    """Each task's mean LLM state (written by precompute_states) by task."""
    return {task: np.load(Path(path) / MEAN_FILE) for task, path in folders.items()}


# ---- the recipe -------------------------------------------------------------------------------------


def _build_llm_side(config: AlignConfig, llm_path: str | None, llm_hidden: int, device: torch.device):
    if config.mode == "none":
        return None
    if config.mode == "frozen":
        return torch.nn.Linear(llm_hidden, config.size.hidden).to(device)

    base, tokenizer = load_base(llm_path, device)
    return LLMRecommender(base, tokenizer, llm_config(config)).to(device)


def _llm_state_dict(llm, mode: str) -> dict[str, torch.Tensor]:
    if mode == "frozen":
        return {f"adapter.{k}": v for k, v in llm.state_dict().items()}
    return llm.trainable_state()


def save_aligned(out_dir: str | Path, sr: SRModel, llm, config: AlignConfig, info: dict,
                 means: dict[str, np.ndarray] | None = None) -> None:
    """The SR checkpoint (docs/DATA.md section 4) and llm/ (none for llm_mode none): the PEFT adapter or the
    preference adapter, everything trainable on the LLM side in one file for resuming, and (frozen) the
    per-task means the LLM states were centred with (STATE_MEANS, read by trainers/teacher.py)."""
    out = Path(out_dir)
    save_checkpoint(out, "sr", sr.config, sr.state_dict(), info)
    if llm is None:
        return
    if config.mode == "frozen":
        write_tensors(out / LLM_DIR / "preference_adapter.safetensors", llm.state_dict())
        write_tensors(out / LLM_DIR / STATE_MEANS, {t: torch.from_numpy(m) for t, m in (means or {}).items()})
    else:
        llm.save_adapter(out / LLM_DIR)
    write_tensors(out / LLM_DIR / TRAINABLE, _llm_state_dict(llm, config.mode))


class AlignRecipe(Recipe):
    """Stage 1: the SR model and the LLM side (LoRA + preference adapter, or the adapter alone when frozen)."""

    name = "align"
    OUTPUTS = (WEIGHTS, CONFIG, TRAIN, LLM_DIR, ITEM_ADAPTER, OPTIMIZER, STATE)

    @classmethod
    def prepare(cls, config: AlignConfig) -> tuple[AlignConfig, dict, dict]:
        import ray.data
        from transformers import AutoConfig

        # A URI is downloaded once into the cache; the workers use that copy, or their node's own.
        folder = FeaturesFolder(config.features)
        config = dataclasses.replace(config, features=folder.source, out=os.path.abspath(config.out))
        counts = train_counts(folder)
        tasks = [task for task in TASKS if counts[task] > 0]
        llm_path, llm_hidden = None, 0
        if config.mode != "none":
            llm_path = str(resolve_llm_path(config.llm))  # converts the packaged GGUF once, here on the driver
            llm_hidden = AutoConfig.from_pretrained(llm_path).hidden_size
        print(f"align: mode {config.mode}, LLM {llm_path}, train examples {counts}, {config.num_workers} workers",
              flush=True)
        init_ray()
        means = {}
        if config.mode == "frozen":
            folders = precompute_states(config, folder, llm_path, tasks, cache_dir())
            sources, means = {task: (path, None) for task, path in folders.items()}, state_means(folders)
        else:
            sources = {task: folder.examples_source(task, "train") for task in tasks}
        datasets = {}
        for task in tasks:
            path, filesystem = sources[task]
            dataset = ray.data.read_parquet(path, filesystem=filesystem)  # streamed into the shards each epoch
            if config.mode == "frozen":
                dataset = dataset.map_batches(_centre, fn_kwargs={"mean": means[task]}, batch_format="numpy")
            else:
                sample = sample_event_ids(folder, task, "train", config.max_examples)
                if sample is not None:
                    dataset = dataset.map_batches(_keep_events, fn_kwargs={"event_ids": sample},
                                                  batch_format="numpy")
            # A global shuffle: the files are grouped by user, and a batch of one user's examples would make
            # near-identical histories each other's negatives.
            datasets[task] = dataset.random_shuffle(seed=config.seed)
        item_tables = None
        if config.item_contrast and config.mode != "none":
            item_tables = llm_item_tables(folder, llm_path, cache_dir())
        return config, datasets, {"folder": folder, "llm_path": llm_path, "llm_hidden": llm_hidden, "means": means,
                                  "item_tables": item_tables}

    def __init__(self, config: AlignConfig, folder: FeaturesFolder, tasks: list[str], llm_path: str | None,
                 llm_hidden: int, means: dict[str, np.ndarray], item_tables: dict[str, str] | None):
        super().__init__(config, folder, tasks)
        self.llm_path, self.llm_hidden, self.means = llm_path, llm_hidden, means
        self.item_table_paths = item_tables

    def setup(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.sr = stage1_sr(c, self.folder).to(self.device)
        self.llm = _build_llm_side(c, self.llm_path, self.llm_hidden, self.device)
        self.texts = ItemTexts.from_folder(self.folder) if c.mode == "lora" else None
        self.item_tables = load_item_tables(self.item_table_paths) if self.item_table_paths else None
        self.item_adapter = None
        if c.item_contrast and c.mode == "none":
            self.item_tables = text_item_tables(self.folder)
            self.item_adapter = torch.nn.Linear(self.folder.text_dim, c.size.hidden).to(self.device)
        self.init_optimizer(*(m for m in (self.sr, self.llm, self.item_adapter) if m is not None))
        state = self.resume()
        self.step, self.epoch = state["step"], state["epoch"]
        self.history, self.resumed_from = state["history"], state["resumed_from"]
        self.start()

    def resume(self) -> dict:
        """Fresh, or the last checkpoint's weights, optimizer state and step count after a worker failure."""
        with restored() as folder:
            if folder is None:
                return {"step": 0, "epoch": 0, "history": [], "resumed_from": []}
            load_state(self.sr, read_weights(folder / WEIGHTS), "resume SR weights")
            if self.config.mode == "frozen":
                saved = read_weights(folder / LLM_DIR / TRAINABLE)
                self.llm.load_state_dict({k[len("adapter."):]: v for k, v in saved.items()})
            elif self.config.mode == "lora":
                self.llm.load_state_dict(read_weights(folder / LLM_DIR / TRAINABLE), strict=False)
            if self.item_adapter is not None:
                self.item_adapter.load_state_dict(read_weights(folder / ITEM_ADAPTER))
            state = read_training_state(folder, self.optimizer)
        print(f"align: resumed from step {state['step']} (epoch {state['epoch']})", flush=True)
        return {"history": [], **state, "resumed_from": state.get("resumed_from", []) + [state["step"]]}

    def train(self) -> None:
        self.started = time.monotonic()
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            sums, done, epoch_start = self.train_epoch(epoch)
            done = any_worker(done, self.device)
            metrics = self.epoch_metrics(epoch, all_reduce(sums.to(self.device)).cpu(), epoch_start)
            if self.rank == 0:
                print("align: epoch done: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in metrics.items()), flush=True)
            self.history.append(metrics)
            self.save(epoch, metrics, final=done or epoch == self.config.epochs)
            if done:
                break

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, bool, float]:
        """One pass over the shards (or up to max_steps): (this worker's sums, whether max_steps was reached,
        the epoch's start time); a checkpoint every checkpoint_every steps."""
        c, n = self.config, len(LOSS_NAMES)
        self.sr.train()
        if self.llm is not None:
            self.llm.train()
        sums = torch.zeros(n + 3, dtype=torch.float64)  # losses, steps, examples, tokens
        epoch_start = time.monotonic()
        for video_rows, comment_rows in self.batches(epoch):
            losses = stage1_losses(self.sr, self.llm, {"video": video_rows, "comment": comment_rows}, c, self.texts,
                                   self.device, self.item_tables, self.item_adapter)
            tokens = losses.pop("tokens", torch.zeros(()))
            loss = total_loss(losses, c)
            self.optimizer_step(loss)
            values = {"total": loss, **losses}
            for i, name in enumerate(LOSS_NAMES):
                if name in values and isinstance(values[name], torch.Tensor):
                    sums[i] += float(values[name].detach())
            sums[n] += 1
            sums[n + 1] += sum(len(r["target"]) for r in (video_rows, comment_rows) if r is not None)
            sums[n + 2] += float(tokens)
            if self.rank == 0 and self.step % c.log_every == 0:
                rate = sums[n + 1] * self.world / max(time.monotonic() - epoch_start, 1e-9)
                print(f"align: epoch {epoch} step {self.step} " + " ".join(
                    f"{k} {float(v.detach()):.4f}" for k, v in values.items() if isinstance(v, torch.Tensor))
                      + f" ~{rate:.1f} examples/s", flush=True)
            done = bool(c.max_steps and self.step >= c.max_steps)
            if done:
                return sums, True, epoch_start
            if self.step % c.checkpoint_every == 0:
                # Resuming from here reads this epoch again from its start.
                self.save(epoch - 1, {"step": self.step, "epoch": epoch}, final=False)
        return sums, False, epoch_start

    def epoch_metrics(self, epoch: int, totals: torch.Tensor, epoch_start: float) -> dict:
        """Mean losses per step and throughput from the sums of every worker."""
        n = len(LOSS_NAMES)
        epoch_s = time.monotonic() - epoch_start
        steps = max(float(totals[n]), 1.0)
        metrics = {f"{name}_loss": float(totals[i]) / steps for i, name in enumerate(LOSS_NAMES)}
        metrics.update(epoch=epoch, step=self.step, epoch_s=round(epoch_s, 3), examples=int(totals[n + 1]),
                       examples_per_s=float(totals[n + 1]) / max(epoch_s, 1e-9),
                       tokens_per_s=float(totals[n + 2]) / max(epoch_s, 1e-9),
                       train_s=time.monotonic() - self.started)
        return metrics

    def save(self, epoch: int, metrics: dict, final: bool) -> None:
        """Report metrics and a checkpoint (module docstring); state.json's epoch is the last one finished."""
        c = self.config
        state = {"step": self.step, "epoch": epoch, "final": final, "history": self.history,
                 "resumed_from": self.resumed_from}

        def write(folder: Path) -> None:
            info = {"align_config": dataclasses.asdict(c), "llm_path": self.llm_path, "mode": c.mode, **metrics,
                    "workers": self.world, "history": self.history, "resumed_from": self.resumed_from}
            save_aligned(folder, self.sr, self.llm, c, info, self.means)
            if self.item_adapter is not None:
                write_tensors(folder / ITEM_ADAPTER, self.item_adapter.state_dict())
            write_training_state(folder, self.optimizer, state)

        self.report(metrics, write)


def align(config: AlignConfig) -> str:
    """Run stage 1 and write the final checkpoint to config.out; returns that folder."""
    if config.export_item_tables:
        check_item_tables_export(config)
    # An export left by an earlier run in this folder belongs to that run's LLM.
    shutil.rmtree(Path(config.out) / ALIGNED_FEATURES, ignore_errors=True)
    config, metrics = AlignRecipe.launch(config)
    out = Path(config.out).resolve()
    print(f"align: wrote {out} ({metrics.get('step')} steps)", flush=True)
    if config.export_item_tables:
        print(f"align: item tables of the aligned LLM in {export_item_tables(out, config.features)}", flush=True)
    return str(out)


def check_item_tables_export(config: AlignConfig) -> None:
    """Before stage 1 runs: export_item_tables needs LoRA and features whose tables are the base LLM's own."""
    if config.mode != "lora":
        raise ValueError(f"AlignConfig.export_item_tables needs llm_mode lora (a frozen LLM's item tables are "
                         f"the features' own), got {config.mode}")
    encoder = FeaturesFolder(config.features).manifest.get("encoder")
    own = {f"{HF_PREFIX}{config.llm}", f"{HF_PREFIX}{resolve_llm_path(config.llm)}"}
    if config.llm == DEFAULT_LLM:
        own.add("llm")
    if encoder not in own:
        raise ValueError(f"AlignConfig.export_item_tables: the features' item tables come from {encoder!r}, not "
                         f"from the LLM {config.llm!r}; build them with encoder=llm (the packaged SmolLM2) or "
                         f"hf:<llm folder>, so that stage 1's SR reads the tables the aligned LLM replaces")


def export_item_tables(aligned: str | Path, features: str | Path) -> str:
    """ALIGNED/features: `features` with its item tables re-embedded by the aligned LLM (the base LLM with
    ALIGNED/llm/lora merged in, mean-pooled final hidden states; features/reembed.py, Ray Data batch inference
    cached by text and adapter weights). Stage 2 and serving read this folder; new items that arrive later are
    embedded by the features job with the same encoder (its manifest's `encoder`)."""
    adapter = Path(aligned) / LLM_DIR / "lora"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{aligned}: no LoRA adapter in {adapter}; only a LoRA stage 1 changes the item tables")
    out = Path(aligned) / ALIGNED_FEATURES
    reembed(features, out, encoder=f"{LORA_PREFIX}{adapter}")
    return str(out)
