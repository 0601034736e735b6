"""Stage 1, personalized preference alignment, on Ray Train (DESIGN.md section 6).

    ckpt = align(AlignConfig(features="FEATURES", out="ALIGNED"))
    lsvcr train align features=FEATURES out=ALIGNED [llm=default|HF_FOLDER] [llm_mode=auto|lora|frozen]

Each worker streams its shard of examples/video/train and examples/comment/train (Ray Data, not materialised
on the driver); every step takes one batch of each task, so the LLM sees video and comment instructions
mixed in one forward pass. Loss = LM (response tokens only; LoRA mode) + rec_weight x (video + comment
InfoNCE of the SR user vector against the target's text vector) + contrast_weight x (sequential-
supplemental contrast both ways + video-comment preference contrast). Every InfoNCE gathers its negatives
from all workers (trainers/losses.py). The SR model is text-only here and uses randomized sorted position
ids; stage 2 (trainers/finetune.py, `init=ALIGNED`) adds the gated ID embeddings.

llm_mode:
- `lora`: the LLM (+ LoRA r 8, alpha 32, dropout 0.1 on the attention projections) runs in every step;
- `frozen`: the base LLM's last-prompt-token states are precomputed once with Ray Data batch inference
  (under CACHE/llm_states/, keyed by the LLM, prompts and train files) and only the preference adapter is trained on
  the LLM side: the cheap option on CPU;
- `auto` (default): lora with use_gpu, frozen without.

Checkpoints (every `checkpoint_every` steps and at the end): the SR model as model.safetensors + config.json
(docs/DATA.md section 4, loadable by stage 2), llm/lora (PEFT save_pretrained) and
llm/preference_adapter.safetensors, optimizer.safetensors (AdamW moments), state.json (step, epoch, per-epoch
history); train.json holds the last metrics and the per-epoch `history`. After a worker failure Ray Train
restarts the workers (FailureConfig(max_failures)) and they resume from the last checkpoint's weights,
optimizer state and step count; the interrupted epoch is read again from its start. `fail_once_at_step`
injects one such failure (tests only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from core.contract import TASKS
from core.paths import cache_dir
from core.runtime import init_ray
from features.folder import FeaturesFolder
from trainers.checkpoint import CONFIG, WEIGHTS, load_state, read_weights, save_checkpoint
from trainers.data import collate, item_time_tensors, text_tensors
from trainers.finetune import (
    INJECTED_FAILURE,
    _joint_batches,
    inject_failure,
    load_optimizer_tensors,
    optimizer_tensors,
)
from trainers.losses import info_nce, item_vectors, seq_sup_contrast, vc_contrast
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

LLM_MODES = ("auto", "lora", "frozen")
STATE_COLUMN = "llm_state"


@dataclass
class AlignConfig:
    features: str  # features folder: a path (shared storage on a cluster) or a URI (copied once per node)
    out: str
    llm: str = DEFAULT_LLM  # "default" (packaged SmolLM2-135M-Instruct) or a local HF checkpoint folder
    llm_mode: str = "auto"
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs)
    max_examples: int = 0  # train examples per task used (0 = all); the LLM is the cost on CPU
    batch_size: int = 16  # per worker and task
    lr: float = 3e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 5.0
    rec_weight: float = 1.0
    contrast_weight: float = 0.5
    vc_contrast: bool = True  # False = the lsvcr_no_vc_contrast ablation
    time_features: bool = True  # item-age and history-gap embeddings (SRConfig.time_features, issue 8)
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
    inference_batch_size: int = 16  # frozen mode: examples per LLM forward in the precompute
    llm_dtype: str = "auto"  # frozen precompute: auto (bfloat16 on GPU or AMX CPUs), float32 or bfloat16
    # SR model (the paper's released configuration); stage 2 must use the same sizes.
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner: int = 256
    dropout: float = 0.3
    max_history: int = 50
    temperature: float = 0.07

    def __post_init__(self):
        if not self.features or not self.out:
            raise ValueError("AlignConfig: features and out are required")
        if self.llm_mode not in LLM_MODES:
            raise ValueError(f"AlignConfig.llm_mode must be one of {LLM_MODES}, got {self.llm_mode!r}")
        for name in ("epochs", "batch_size", "num_workers", "log_every", "checkpoint_every",
                     "max_prompt_tokens", "max_response_tokens", "inference_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"AlignConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_examples", "weight_decay", "max_grad_norm", "rec_weight",
                     "contrast_weight", "shuffle_buffer", "max_failures", "fail_once_at_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"AlignConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"AlignConfig.lr must be > 0, got {self.lr}")
        if self.llm_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"AlignConfig.llm_dtype must be auto, float32 or bfloat16, got {self.llm_dtype!r}")

    @property
    def mode(self) -> str:
        if self.llm_mode == "auto":
            return "lora" if self.use_gpu else "frozen"
        return self.llm_mode


def sr_config(config: AlignConfig, text_dim: int) -> SRConfig:
    return SRConfig(text_dim=text_dim, hidden=config.hidden, num_layers=config.num_layers,
                    num_heads=config.num_heads, inner=config.inner, dropout=config.dropout,
                    max_history=config.max_history, temperature=config.temperature,
                    use_id_embedding=False, random_positions=True, time_features=config.time_features)


def llm_config(config: AlignConfig) -> LLMConfig:
    return LLMConfig(sr_hidden=config.hidden, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                     lora_dropout=config.lora_dropout, frozen=config.mode == "frozen",
                     max_prompt_tokens=config.max_prompt_tokens, max_response_tokens=config.max_response_tokens)


# ---- one step (pure torch: used by the Ray Train loop and by the tests) ---------------------------------


def stage1_losses(sr: SRModel, llm, batches: dict[str, dict | None], config: AlignConfig, texts: ItemTexts,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Losses of one step. batches maps task -> example rows (numpy batch; frozen mode: with the
    llm_state column) or None. `llm` is an LLMRecommender (lora) or the preference adapter nn.Linear
    (frozen). Every worker calls the same collectives whatever its batches hold (empty tensors stand in)."""
    h = config.hidden
    users, prefs, video_h, comment_h, is_video, losses = [], [], [], [], [], {}
    prompts, responses, states = [], [], []
    for task in TASKS:
        rows = batches.get(task)
        if rows is None or len(rows["target"]) == 0:
            # An empty stand-in keeps the collectives of info_nce in step with the other workers.
            losses[f"rec_{task}"] = info_nce(torch.zeros(0, h, device=device), torch.zeros(0, h, device=device),
                                             config.temperature, torch.zeros(0, dtype=torch.long, device=device))
            continue
        batch = {k: v.to(device) for k, v in collate(rows, config.max_history).items()}
        out = sr.stage1_vectors(batch, batch["query_video"] if task == "comment" else None)
        items = item_vectors(sr, task, batch["target"], batch.get("ts"))
        losses[f"rec_{task}"] = info_nce(out["user"], items, config.temperature, batch["target"])
        users.append(out["user"])
        video_h.append(out["video_history"])
        comment_h.append(out["comment_history"])
        is_video.append(torch.full((len(items),), task == "video", device=device))
        if config.mode == "frozen":
            states.append(torch.from_numpy(np.stack(list(rows[STATE_COLUMN])).astype(np.float32)))
        else:
            p, r = render_examples(rows, task, texts, llm.count_tokens, config.max_prompt_tokens)
            prompts += p
            responses += r
    if config.mode == "frozen":
        if states:
            prefs = torch.nn.functional.normalize(llm(torch.cat(states).to(device)), dim=-1)
    elif prompts:
        enc = {k: v.to(device) for k, v in llm.encode(prompts, responses).items()}
        out = llm(enc)  # video and comment instructions in one forward
        prefs = torch.nn.functional.normalize(out["preference"], dim=-1)
        if out["lm_loss"] is not None:
            losses["lm"] = out["lm_loss"]
        losses["tokens"] = enc["attention_mask"].sum().detach().float()
    if len(users):
        user, video_h, comment_h, is_video = (torch.cat(x) for x in (users, video_h, comment_h, is_video))
    else:
        user = video_h = comment_h = torch.zeros(0, h, device=device)
        prefs = torch.zeros(0, h, device=device)
        is_video = torch.zeros(0, dtype=torch.bool, device=device)
    losses["seq_sup"] = seq_sup_contrast(user, prefs, config.temperature)
    if config.vc_contrast:
        losses["vc"] = vc_contrast(prefs, video_h, comment_h, is_video, config.temperature)
    return losses


def total_loss(losses: dict[str, torch.Tensor], config: AlignConfig) -> torch.Tensor:
    """LM + rec_weight x rec + contrast_weight x contrast."""
    rec = losses["rec_video"] + losses["rec_comment"]
    contrast = losses["seq_sup"] + losses.get("vc", 0.0)
    return losses.get("lm", 0.0) + config.rec_weight * rec + config.contrast_weight * contrast


# ---- inside each Ray Train worker ----------------------------------------------------------------------


def _trainable(modules) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _sync(params: list[torch.nn.Parameter], world: int, grads: bool) -> None:
    """Broadcast rank 0's values (grads=False) or average the gradients (grads=True, missing = zeros) of
    the trainable parameters only: the frozen LLM base never crosses the wire."""
    if not dist.is_initialized() or world == 1:
        for p in params:
            if grads and p.grad is None:
                p.grad = torch.zeros_like(p)
        return
    tensors = [(p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.data for p in params]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if grads:
        dist.all_reduce(flat)
        flat /= world
    else:
        dist.broadcast(flat, src=0)
    offset = 0
    for p in params:
        chunk = flat[offset: offset + p.numel()].view_as(p)
        if grads:
            p.grad = chunk.clone()
        else:
            p.data.copy_(chunk)
        offset += p.numel()


def _build_llm_side(config: AlignConfig, llm_path: str | None, llm_hidden: int, device: torch.device):
    if config.mode == "frozen":
        return torch.nn.Linear(llm_hidden, config.hidden).to(device)

    base, tokenizer = load_base(llm_path, device)
    return LLMRecommender(base, tokenizer, llm_config(config)).to(device)


def _llm_state_dict(llm, mode: str) -> dict[str, torch.Tensor]:
    if mode == "frozen":
        return {f"adapter.{k}": v for k, v in llm.state_dict().items()}
    return llm.trainable_state()


def save_aligned(out_dir: str | Path, sr: SRModel, llm, config: AlignConfig, state: dict, info: dict,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """SR checkpoint (docs/DATA.md section 4) + llm/ (PEFT adapter, preference adapter) + state.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_checkpoint(out, "sr", sr.config, sr.state_dict(), info)
    if config.mode == "frozen":
        (out / "llm").mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in llm.state_dict().items()},
                  str(out / "llm" / "preference_adapter.safetensors"))
    else:
        llm.save_adapter(out / "llm")
    # Everything trainable on the LLM side in one file, for resuming.
    save_file({k: v.detach().cpu().contiguous() for k, v in _llm_state_dict(llm, config.mode).items()},
              str(out / "llm" / "trainable.safetensors"))
    if optimizer is not None:
        save_file(optimizer_tensors(optimizer), str(out / "optimizer.safetensors"))
    (out / "state.json").write_text(json.dumps(state) + "\n")


def _resume(sr: SRModel, llm, optimizer: torch.optim.Optimizer, config: AlignConfig) -> dict:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "history": [], "resumed_from": []}
    with checkpoint.as_directory() as folder:
        load_state(sr, read_weights(Path(folder) / WEIGHTS), "resume SR weights")
        saved = read_weights(Path(folder) / "llm" / "trainable.safetensors")
        if config.mode == "frozen":
            llm.load_state_dict({k[len("adapter."):]: v for k, v in saved.items()})
        else:
            llm.load_state_dict(saved, strict=False)
        if (Path(folder) / "optimizer.safetensors").is_file():
            load_optimizer_tensors(optimizer, read_weights(Path(folder) / "optimizer.safetensors"))
        state = json.loads((Path(folder) / "state.json").read_text())
    print(f"align: resumed from step {state['step']} (epoch {state['epoch']})", flush=True)
    return {"history": [], **state, "resumed_from": state.get("resumed_from", []) + [state["step"]]}


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    config = AlignConfig(**loop_config["config"])
    folder = loop_config["folder"].on_this_node()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    sr = SRModel(SRConfig(**loop_config["sr_config"]))
    sr.set_text_tables(*text_tensors(folder))
    sr.set_item_times(*item_time_tensors(folder))  # a no-op without time features
    sr.to(device)
    llm = _build_llm_side(config, loop_config["llm_path"], loop_config["llm_hidden"], device)
    texts = ItemTexts.from_folder(folder) if config.mode == "lora" else None
    params = _trainable([sr, llm])
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state = _resume(sr, llm, optimizer, config)
    _sync(params, world, grads=False)
    torch.manual_seed(config.seed + 1 + rank + 1000 * state["step"])
    shards = {task: ray.train.get_dataset_shard(task) for task in loop_config["tasks"]}
    names = ("total", "lm", "rec_video", "rec_comment", "seq_sup", "vc")
    step, started = state["step"], time.monotonic()
    history, resumed_from = state["history"], state["resumed_from"]

    def checkpoint(epoch: int, metrics: dict, final: bool) -> None:
        state_now = {"step": step, "epoch": epoch, "final": final, "history": history,
                     "resumed_from": resumed_from}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                info = {"align_config": dataclasses.asdict(config), "llm_path": loop_config["llm_path"],
                        "mode": config.mode, **metrics, "workers": world, "history": history,
                        "resumed_from": resumed_from}
                save_aligned(tmp, sr, llm, config, state_now, info, optimizer)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    metrics = {}
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        sr.train()
        llm.train()
        sums = torch.zeros(len(names) + 3, dtype=torch.float64)  # losses, steps, examples, tokens
        epoch_start = time.monotonic()
        done = False
        for video_rows, comment_rows in _joint_batches(shards, config, epoch, device):
            losses = stage1_losses(sr, llm, {"video": video_rows, "comment": comment_rows}, config, texts, device)
            tokens = losses.pop("tokens", torch.zeros(()))
            loss = total_loss(losses, config)
            optimizer.zero_grad(set_to_none=True)
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
            _sync(params, world, grads=True)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            step += 1
            inject_failure(config, step, rank)
            values = {"total": loss, **losses}
            for i, name in enumerate(names):
                if name in values and isinstance(values[name], torch.Tensor):
                    sums[i] += float(values[name].detach())
            sums[len(names)] += 1
            sums[len(names) + 1] += sum(len(r["target"]) for r in (video_rows, comment_rows) if r is not None)
            sums[len(names) + 2] += float(tokens)
            if rank == 0 and step % config.log_every == 0:
                rate = sums[len(names) + 1] * world / max(time.monotonic() - epoch_start, 1e-9)
                print(f"align: epoch {epoch} step {step} " + " ".join(
                    f"{k} {float(v.detach()):.4f}" for k, v in values.items() if isinstance(v, torch.Tensor))
                      + f" ~{rate:.1f} examples/s", flush=True)
            done = bool(config.max_steps and step >= config.max_steps)
            if step % config.checkpoint_every == 0 and not done:
                checkpoint(epoch - 1, {"step": step, "epoch": epoch}, final=False)
            if done:
                break
        if dist.is_initialized():
            flags = torch.tensor([float(done)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            done = bool(flags.item())
        totals = sums.to(device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals.cpu()
        epoch_s = time.monotonic() - epoch_start
        steps = max(float(totals[len(names)]), 1.0)
        metrics = {f"{name}_loss": float(totals[i]) / steps for i, name in enumerate(names)}
        metrics.update(epoch=epoch, step=step, epoch_s=round(epoch_s, 3),
                       examples=int(totals[len(names) + 1]),
                       examples_per_s=float(totals[len(names) + 1]) / max(epoch_s, 1e-9),
                       tokens_per_s=float(totals[len(names) + 2]) / max(epoch_s, 1e-9),
                       train_s=time.monotonic() - started)
        if rank == 0:
            print("align: epoch done: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in metrics.items()), flush=True)
        history.append(metrics)
        final = done or epoch == config.epochs
        checkpoint(epoch, metrics, final=final)
        if done:
            break


# ---- driver --------------------------------------------------------------------------------------------


class _LLMStates:
    """Ray Data batch inference (frozen mode): example rows -> + llm_state (the base LLM's final hidden
    state at the last prompt token)."""

    def __init__(self, llm_path: str, task: str, folder: FeaturesFolder, max_prompt_tokens: int,
                 dtype: str = "auto"):
        folder = folder.on_this_node()
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        base, tokenizer = load_base(llm_path, dtype=inference_dtype(dtype))
        self.llm = LLMRecommender(base, tokenizer, LLMConfig(frozen=True, max_prompt_tokens=max_prompt_tokens))
        self.llm.eval()
        self.task, self.texts, self.max_prompt_tokens = task, ItemTexts.from_folder(folder), max_prompt_tokens

    @torch.no_grad()
    def __call__(self, rows: dict) -> dict:
        prompts, _ = render_examples(rows, self.task, self.texts, self.llm.count_tokens, self.max_prompt_tokens)
        last, _ = self.llm.hidden(self.llm.encode(prompts))  # [n, llm_hidden]
        states = last.float().numpy()
        rows[STATE_COLUMN] = states  # [n, llm_hidden]
        rows["llm_tokens"] = np.array([self.llm.count_tokens(p) for p in prompts], dtype=np.int64)
        return rows


def states_key(config: AlignConfig, folder: FeaturesFolder, llm_path: str, task: str) -> dict:
    """What the LLM states of a task depend on: the LLM, the prompt budget and dtype, the example cap and the
    train files themselves (names and sizes, so a rebuilt features folder at the same path is not reused)."""
    source = folder.examples_dir(task, "train")
    files = sorted((p.name, p.stat().st_size) for p in source.glob("*.parquet"))
    return {"llm": str(llm_path), "max_prompt_tokens": config.max_prompt_tokens, "dtype": config.llm_dtype,
            "max_examples": config.max_examples, "source": str(source), "files": files}


def precompute_states(config: AlignConfig, folder: FeaturesFolder, llm_path: str, tasks: list[str], root: Path,
                      fresh: bool = False) -> dict[str, str]:
    """Frozen mode: write examples + llm_state per task under root/llm_states/<hash of states_key>/<task>,
    reused by every later run with the same key (the suite's three stage 1 runs share one precompute).
    fresh=True computes them again even when they are there (the train benchmark times this)."""
    import hashlib

    import ray.data

    folders = {}
    for task in tasks:
        key = json.loads(json.dumps(states_key(config, folder, llm_path, task)))  # tuples -> lists, as read back
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        states = root / "llm_states" / digest / task
        marker = states / "_done.json"
        if fresh or not (marker.is_file() and json.loads(marker.read_text()) == key):
            shutil.rmtree(states, ignore_errors=True)
            started = time.monotonic()
            path, filesystem = folder.examples_source(task, "train")
            dataset = ray.data.read_parquet(path, filesystem=filesystem)
            if config.max_examples:
                dataset = dataset.limit(config.max_examples)
            dataset = dataset.map_batches(
                _LLMStates, fn_constructor_kwargs={"llm_path": str(llm_path), "task": task, "folder": folder,
                                                   "max_prompt_tokens": config.max_prompt_tokens,
                                                   "dtype": config.llm_dtype},
                batch_size=config.inference_batch_size, batch_format="numpy", concurrency=1)
            dataset.write_parquet(str(states))
            rows = ray.data.read_parquet(str(states)).count()
            marker.write_text(json.dumps(key))
            print(f"align: LLM states for {rows} {task} examples in {time.monotonic() - started:.1f}s", flush=True)
        folders[task] = str(states)
    return folders


def align(config: AlignConfig) -> str:
    """Run stage 1 and write the final checkpoint to config.out; returns that folder."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoConfig

    # A URI is downloaded once into the cache; the workers use that copy, or their node's own.
    folder = FeaturesFolder(config.features)
    config = dataclasses.replace(config, features=folder.source, out=os.path.abspath(config.out))
    out = Path(config.out).resolve()
    (out / INJECTED_FAILURE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    counts = {task: folder.count_examples(task, "train") for task in TASKS}
    tasks = [task for task in TASKS if counts[task] > 0]
    if not tasks:
        raise ValueError(f"{folder}: no train examples for either task")
    llm_path = str(resolve_llm_path(config.llm))  # converts the packaged GGUF once, here on the driver
    llm_hidden = AutoConfig.from_pretrained(llm_path).hidden_size
    print(f"align: mode {config.mode}, LLM {llm_path}, train examples {counts}, {config.num_workers} workers",
          flush=True)
    init_ray()
    if config.mode == "frozen":
        sources = {task: (path, None) for task, path in
                   precompute_states(config, folder, llm_path, tasks, cache_dir()).items()}
    else:
        sources = {task: folder.examples_source(task, "train") for task in tasks}
    datasets = {}
    for task in tasks:
        path, filesystem = sources[task]
        dataset = ray.data.read_parquet(path, filesystem=filesystem)  # streamed into the workers' shards each epoch
        if config.max_examples and config.mode != "frozen":
            dataset = dataset.limit(config.max_examples)
        datasets[task] = dataset
    resources = {"CPU": 1, "GPU": 1} if config.use_gpu else {"CPU": 1}
    storage_path = config.storage_path or tempfile.mkdtemp(prefix="lsvcr-align-")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": dataclasses.asdict(config),
                           "sr_config": dataclasses.asdict(sr_config(config, folder.text_dim)),
                           "llm_path": llm_path, "llm_hidden": llm_hidden, "tasks": tasks,
                           "folder": folder},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=f"align-{int(time.time())}", storage_path=storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("align: training ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        for name in os.listdir(ckpt):
            source, target = Path(ckpt) / name, out / name
            if source.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)
            elif name in (WEIGHTS, CONFIG) or source.suffix in (".json", ".safetensors"):
                shutil.copy2(source, target)
    if not config.storage_path:
        shutil.rmtree(storage_path, ignore_errors=True)
    print(f"align: wrote {out} ({result.metrics.get('step')} steps)", flush=True)
    return str(out)
