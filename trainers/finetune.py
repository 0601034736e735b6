"""Stage 2, recommendation-oriented fine-tuning, on Ray Train.

    ckpt = finetune(FinetuneConfig(features="FEATURES", out="CKPT"))        # SR model, video + comment
    ckpt = finetune(FinetuneConfig(features=..., out=..., model="sasrec"))  # the ID-only baseline
    lsvcr train finetune features=FEATURES out=CKPT [key=value ...]

Each worker streams its shard of examples/video/train and examples/comment/train (Ray Data datasets given to
the TorchTrainer, read through `get_dataset_shard` batch by batch). Train sets larger than
`materialize_max_mb` on disk are read from Parquet every epoch and never materialised, so memory does not grow
with the number of examples; smaller ones are materialised once in the object store, which makes each epoch
much cheaper than re-running the read on a small machine. Every step takes one batch of each task and sums the
losses (trainers/losses.py). After each epoch rank 0 evaluates the valid split (same code as
trainers/evaluate.py) and keeps the best epoch's weights; training stops early after `patience` epochs
without a better valid NDCG@5 (mean over the two tasks).

Every epoch ends with a Ray Train checkpoint: model.safetensors holds the best weights so far (so the last
checkpoint is the result, copied to `out`, docs/DATA.md section 4), train.json the per-epoch history, and
resume/ the current weights, the AdamW moments and state.json (epoch, global step, early-stopping counter).
After a worker failure Ray Train restarts the workers (FailureConfig(max_failures)) and they continue from
the last finished epoch with the same step count; `fail_once_at_step` injects one such failure (tests only).

In-batch negatives are per worker for now (trainers/losses.py). Gradients are averaged by hand, not by DDP
(see _average_gradients). Workers memory-map the embeddings and rank 0 reads the valid split from the
features folder: a path must be readable by every worker (shared storage on a cluster); a URI (s3://...) is
copied once per node into the cache (features/folder.py), and the train split is read through it.

Stage 1 seam: `init` names an earlier checkpoint whose SR parameters are loaded (strict on names and
shapes) before training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional  # not `str | None`: core.config coerces typing.Optional only

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
import torch.distributed as dist

from core.contract import TASKS
from core.runtime import init_ray
from features.folder import FeaturesFolder
from trainers.checkpoint import CONFIG, TRAIN, WEIGHTS, load_init_weights, load_state, read_weights, save_checkpoint
from trainers.data import collate, item_time_tensors, text_tensors
from trainers.evaluate import evaluate_fns, scorer_fn
from trainers.losses import comment_loss, id_text_loss, video_loss
from trainers.models import MODELS, SASRecConfig, SRConfig, build_model
from trainers.scoring import Scorer


@dataclass
class FinetuneConfig:
    features: str  # features folder (docs/DATA.md section 3): a path (shared storage on a cluster) or a URI
    out: str  # checkpoint folder to write
    model: str = "sr"  # "sr" or "sasrec"
    text_only: bool = False  # SR without ID embeddings (the sr_text_only baseline)
    time_features: bool = True  # item-age and history-gap embeddings (SRConfig.time_features, issue 8)
    init: Optional[str] = None  # checkpoint folder whose SR weights start training (stage 1 output)
    epochs: int = 10
    patience: int = 2  # stop after this many epochs without a better valid NDCG@5
    batch_size: int = 256  # per worker and task
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 5.0  # 0 = no clipping
    id_text_weight: float = 0.1  # weight of the ID-text contrast (SR with ID embeddings)
    train_negatives: int = 20  # sampled negatives per video example added to the in-batch ones (0 = none)
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer (0 = file order)
    max_eval_examples: int = 20000  # valid examples per task evaluated each epoch (0 = all)
    log_every: int = 50  # steps between progress lines
    storage_path: Optional[str] = None  # Ray Train storage (shared on a cluster); None = a temporary folder
    max_failures: int = 1  # worker failures Ray Train recovers from (resuming from the last epoch's checkpoint)
    # Train examples up to this size on disk (both tasks) are materialised once in the object store; larger
    # ones are streamed from Parquet every epoch. 0 = always stream.
    materialize_max_mb: int = 256
    fail_once_at_step: int = 0  # tests only: rank 0 raises once after this global step (0 = never)
    # Model size (defaults: the paper's released configuration).
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner: int = 256
    dropout: float = 0.3
    max_history: int = 50
    temperature: float = 0.07

    def __post_init__(self):
        if not self.features or not self.out:
            raise ValueError("FinetuneConfig: features and out are required")
        if self.model not in MODELS:
            raise ValueError(f"FinetuneConfig.model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.model != "sr" and (self.text_only or self.init):
            raise ValueError("FinetuneConfig: text_only and init only apply to model='sr'")
        for name in ("epochs", "patience", "batch_size", "num_workers", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "id_text_weight", "train_negatives", "shuffle_buffer",
                     "max_eval_examples", "max_failures", "fail_once_at_step", "materialize_max_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"FinetuneConfig.lr must be > 0, got {self.lr}")


def model_config(config: FinetuneConfig, num_videos: int, num_comments: int, text_dim: int):
    size = dict(hidden=config.hidden, num_layers=config.num_layers, num_heads=config.num_heads,
                inner=config.inner, dropout=config.dropout, max_history=config.max_history,
                temperature=config.temperature, num_videos=num_videos, num_comments=num_comments)
    if config.model == "sasrec":
        return SASRecConfig(**size)
    return SRConfig(**size, text_dim=text_dim, use_id_embedding=not config.text_only,
                    time_features=config.time_features)


# Columns holding video and comment indices, per task (the item indices that get gradients in training).
VIDEO_COLUMNS = {"video": ("target", "negatives", "hist_video", "hist_cmt_video"),
                 "comment": ("query_video", "hist_video", "hist_cmt_video")}
COMMENT_COLUMNS = {"video": ("hist_video_hot", "hist_cmt_comments"),
                   "comment": ("target", "negatives", "hist_video_hot", "hist_cmt_comments")}


def seen_items(folder: FeaturesFolder, num_videos: int, num_comments: int) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks [V], [C] of the items that appear anywhere in the train examples (and so get a trained
    ID embedding); all other items are scored without their ID embedding."""
    seen = {"video": np.zeros(num_videos, dtype=bool), "comment": np.zeros(num_comments, dtype=bool)}
    for task in TASKS:
        dataset = pads.dataset(folder.examples_dir(task, "train"), format="parquet")
        for batch in dataset.to_batches(columns=list(set(VIDEO_COLUMNS[task] + COMMENT_COLUMNS[task]))):
            for kind, columns in (("video", VIDEO_COLUMNS[task]), ("comment", COMMENT_COLUMNS[task])):
                for name in columns:
                    col = batch.column(name)
                    values = pc.list_flatten(col) if hasattr(col.type, "value_type") else col
                    idx = values.to_numpy(zero_copy_only=False).astype(np.int64)
                    idx = idx[idx >= 0]
                    if len(idx) and idx.max() >= len(seen[kind]):
                        raise ValueError(f"{task}/train column {name} has {kind} index {idx.max()} beyond "
                                         f"the {len(seen[kind])} embedded {kind}s")
                    seen[kind][idx] = True
    return seen["video"], seen["comment"]


# ---- inside each Ray Train worker -----------------------------------------------------------------------


def _broadcast_parameters(model: torch.nn.Module) -> None:
    """Same starting weights on every worker (rank 0's)."""
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """All-reduce the gradients as one flat buffer. Done by hand rather than with DDP because a step may
    use only part of the model (one task's shard ran out, or a worker has no batch left) and the model is
    called through several methods rather than forward(); missing gradients count as zeros."""
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not dist.is_initialized() or world == 1:
        for p, g in zip(params, grads):
            p.grad = g
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p)
        offset += p.numel()


INJECTED_FAILURE = ".injected_failure"  # marker in the output folder: the test failure has happened


def inject_failure(config, step: int, rank: int) -> None:
    """Tests only: rank 0 raises once when the global step reaches config.fail_once_at_step. The marker file
    in config.out (written before raising, removed by the driver at the start of a run) keeps the restarted
    workers from failing again."""
    if not config.fail_once_at_step or step != config.fail_once_at_step or rank != 0:
        return
    marker = Path(config.out) / INJECTED_FAILURE
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{step}\n")
    raise RuntimeError(f"injected worker failure after step {step} (fail_once_at_step, tests only)")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat safetensors-ready tensors "<param index>.<name>" (no
    pickle on disk); the hyper-parameters come from the config on load."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _joint_batches(shards: dict, config: FinetuneConfig, epoch: int, device: torch.device):
    """Pairs (video rows | None, comment rows | None) until every worker has run out of both tasks (the
    shorter task gives None for the rest of the epoch). All workers take the same number of steps, as
    the gradient all-reduce needs."""
    iters = {
        task: iter(shard.iter_batches(
            batch_size=config.batch_size, batch_format="numpy",
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            local_shuffle_seed=(config.seed + epoch) if config.shuffle_buffer else None))
        for task, shard in shards.items()
    }
    while True:
        got = {task: next(it, None) for task, it in iters.items()}
        more = torch.tensor([float(any(rows is not None for rows in got.values()))], device=device)
        if dist.is_initialized():
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            return
        yield got.get("video"), got.get("comment")


RESUME = "resume"  # checkpoint subfolder: current weights, optimizer state, state.json


def _save_resume(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    save_file(optimizer_tensors(optimizer), str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps(state) + "\n")


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """Training state to start from: fresh, or the last Ray Train checkpoint's after a worker failure (current
    weights and AdamW moments on every rank; best weights, history and the early-stopping counter)."""
    import ray.train

    fresh = {"epoch": 0, "step": 0, "stale": 0, "stopped": False, "history": [], "train_s": 0.0,
             "resumed_from": [], "best": {"score": -math.inf, "epoch": 0, "state": None, "valid": None}}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return fresh
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        state = json.loads((folder / RESUME / "state.json").read_text())
        load_state(model, read_weights(folder / RESUME / "model.safetensors"), "resume weights")
        load_optimizer_tensors(optimizer, read_weights(folder / RESUME / "optimizer.safetensors"))
        info = json.loads((folder / TRAIN).read_text())
        best_state = read_weights(folder / WEIGHTS) if rank == 0 else None
    if rank == 0:
        print(f"finetune: resumed after epoch {state['epoch']} (step {state['step']})", flush=True)
    return {"epoch": state["epoch"], "step": state["step"], "stale": state["stale"], "stopped": state["stopped"],
            "history": info["history"], "train_s": info["train_s"],
            "resumed_from": state["resumed_from"] + [state["step"]],
            "best": {"score": state["best_score"], "epoch": info["best_epoch"], "state": best_state,
                     "valid": info["valid"]}}


def _valid_score(results: dict) -> float | None:
    """Mean valid NDCG@5 over the tasks that have valid examples."""
    values = [m["model"]["ndcg@5"] for m in results.values() if m["model"]["ndcg@5"] is not None]
    return float(np.mean(values)) if values else None


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    config = FinetuneConfig(**loop_config["config"])
    folder = loop_config["folder"].on_this_node()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.seed)
    model = build_model(config.model, loop_config["model_config"])
    if loop_config["video_seen"] is not None:
        model.set_seen(torch.tensor(loop_config["video_seen"]), torch.tensor(loop_config["comment_seen"]))
    if config.init:
        fresh = load_init_weights(model, config.init)
        if "video_id.weight" in fresh:
            model.zero_id_embeddings()  # start exactly at the stage 1 function (see SRModel)
        if rank == 0:
            print(f"finetune: loaded {config.init}; freshly initialised: {fresh}", flush=True)
    model.set_text_tables(*text_tensors(folder))
    if config.model == "sr":
        model.set_item_times(*item_time_tensors(folder))  # a no-op without time features
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = _resume(model, optimizer, rank)
    _broadcast_parameters(model)
    torch.manual_seed(config.seed + 1 + rank + 1000 * state["step"])  # dropout masks differ between workers
    use_id_text = config.model == "sr" and not config.text_only and config.id_text_weight > 0
    shards = {task: ray.train.get_dataset_shard(task) for task in loop_config["tasks"]}
    loss_names = ("video", "comment", "id_text")
    weights = {"video": 1.0, "comment": 1.0, "id_text": config.id_text_weight}

    best, history, stale, step = state["best"], state["history"], state["stale"], state["step"]
    started = time.monotonic() - state["train_s"]
    stop = torch.tensor([float(state["stopped"])], device=device)
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if stop.item():
            break  # the failure came after the last epoch's checkpoint
        model.train()
        # Loss sums, loss counts, examples; kept on the device so steps need no extra synchronisation.
        sums = torch.zeros(2 * len(loss_names) + 1, dtype=torch.float64, device=device)
        epoch_start = time.monotonic()
        for video_rows, comment_rows in _joint_batches(shards, config, epoch, device):
            losses = {}
            video_batch = comment_batch = None
            if video_rows is not None:
                video_batch = {k: v.to(device) for k, v in collate(video_rows, config.max_history).items()}
                losses["video"] = video_loss(model, video_batch, config.train_negatives)
            if comment_rows is not None:
                comment_batch = {k: v.to(device) for k, v in collate(comment_rows, config.max_history).items()}
                losses["comment"] = comment_loss(model, comment_batch)
            if use_id_text and losses:
                term = id_text_loss(model, None if video_batch is None else video_batch["target"],
                                    None if comment_batch is None else comment_batch["target"],
                                    config.temperature)
                if term is not None:
                    losses["id_text"] = term
            optimizer.zero_grad(set_to_none=True)
            if losses:
                sum(weights[name] * value for name, value in losses.items()).backward()
            _average_gradients(model, world)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            step += 1
            inject_failure(config, step, rank)
            for i, name in enumerate(loss_names):
                if name in losses:
                    sums[i] += losses[name].detach()
                    sums[len(loss_names) + i] += 1
            sums[-1] += sum(len(r["target"]) for r in (video_rows, comment_rows) if r is not None)
            if rank == 0 and step % config.log_every == 0:
                parts = " ".join(f"{k}_loss {v.item():.4f}" for k, v in losses.items())
                print(f"finetune: epoch {epoch} step {step} {parts}", flush=True)
        if dist.is_initialized():
            dist.all_reduce(sums)  # totals over workers
        sums = sums.cpu()
        epoch_s = time.monotonic() - epoch_start
        means = {f"{name}_loss": (float(sums[i] / sums[len(loss_names) + i]) if sums[len(loss_names) + i] else None)
                 for i, name in enumerate(loss_names)}
        loss = sum(weights[name] * means[f"{name}_loss"] for name in loss_names if means[f"{name}_loss"] is not None)
        record = {"epoch": epoch, "step": step, "loss": loss, **means, "examples": int(sums[-1]),
                  "epoch_s": round(epoch_s, 3),
                  "examples_per_s": float(sums[-1]) / max(epoch_s, 1e-9)}

        stop = torch.zeros(1, device=device)
        if rank == 0:
            valid = evaluate_fns(folder, {"model": scorer_fn(Scorer.from_model(config.model, model, folder))},
                                 "valid", max_examples=config.max_eval_examples)
            model.train()
            score = _valid_score(valid)
            record["valid_ndcg@5"] = score
            record["valid"] = {task: valid[task]["model"] for task in valid}
            # Without valid examples every epoch counts as the best so far (the last one is kept).
            if score is None or score > best["score"]:
                best.update(score=-math.inf if score is None else score, epoch=epoch, valid=record["valid"],
                            state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                stale = 0
            else:
                stale += 1
            stop[0] = float(stale >= config.patience)
            print(f"finetune: epoch {epoch} done: " + " ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in record.items() if k != "valid" and v is not None) + f" best_epoch {best['epoch']}",
                flush=True)
        if dist.is_initialized():
            dist.broadcast(stop, src=0)
        history.append(record)
        metrics = {**{k: v for k, v in record.items() if k != "valid"}, "best_epoch": best["epoch"],
                   "epochs_run": len(history), "train_s": time.monotonic() - started}
        if rank != 0:
            ray.train.report(metrics)
            continue
        train_info = {"finetune_config": dataclasses.asdict(config), "best_epoch": best["epoch"],
                      "epochs_run": len(history), "train_s": metrics["train_s"], "valid": best["valid"],
                      "history": history, "resumed_from": state["resumed_from"], "workers": world}
        resume = {"epoch": epoch, "step": step, "stale": stale, "best_score": best["score"],
                  "stopped": bool(stop.item()), "resumed_from": state["resumed_from"]}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, config.model, model.config, best["state"], train_info)
            _save_resume(Path(tmp) / RESUME, model, optimizer, resume)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ---- driver ---------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> str:
    """Train with Ray Train and write CKPT (model.safetensors, config.json, train.json) to config.out;
    returns that folder."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    folder = FeaturesFolder(config.features)  # a URI: downloaded once into the cache
    config = dataclasses.replace(config, features=folder.source, out=os.path.abspath(config.out),
                                 init=os.path.abspath(config.init) if config.init else None)
    counts = {task: folder.count_examples(task, "train") for task in TASKS}
    tasks = [task for task in TASKS if counts[task] > 0]
    if not tasks:
        raise ValueError(f"{folder}: no train examples for either task")
    model_cfg = model_config(config, folder.num_videos, folder.num_comments, folder.text_dim)
    video_seen = comment_seen = None
    if config.model == "sr" and not config.text_only:
        video_seen, comment_seen = seen_items(folder, folder.num_videos, folder.num_comments)
    print(f"finetune: model {config.model}, train examples {counts}, {folder.num_videos} videos, "
          f"{folder.num_comments} comments, {config.num_workers} workers", flush=True)

    (Path(config.out) / INJECTED_FAILURE).unlink(missing_ok=True)
    init_ray()
    # Large train sets stream from Parquet into the workers' shards every epoch, so memory stays flat however
    # many examples there are. Small ones are materialised once: re-running the read every epoch cost far
    # more than the epoch itself on 2 busy cores (measured: ~20 s vs ~100 s per epoch on 26k examples).
    on_disk = sum(f.stat().st_size for task in tasks
                  for f in folder.examples_dir(task, "train").rglob("*.parquet"))
    stream = on_disk > config.materialize_max_mb * 2**20
    datasets = {}
    for task in tasks:
        path, filesystem = folder.examples_source(task, "train")
        dataset = ray.data.read_parquet(path, filesystem=filesystem)
        datasets[task] = dataset if stream else dataset.materialize()
    print(f"finetune: train examples {on_disk / 2**20:.1f} MB on disk: "
          f"{'streamed from Parquet every epoch' if stream else 'materialised once in the object store'}", flush=True)
    resources = {"CPU": 1, "GPU": 1} if config.use_gpu else {"CPU": 1}
    storage_path = config.storage_path or tempfile.mkdtemp(prefix="lsvcr-finetune-")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": dataclasses.asdict(config), "model_config": dataclasses.asdict(model_cfg),
                           "tasks": tasks, "video_seen": video_seen, "comment_seen": comment_seen,
                           "folder": folder},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=f"finetune-{config.model}-{int(time.time())}", storage_path=storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("finetune: training ended without a checkpoint")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt:
        for name in (WEIGHTS, CONFIG, TRAIN):
            shutil.copy2(os.path.join(ckpt, name), out / name)
    if not config.storage_path:
        shutil.rmtree(storage_path, ignore_errors=True)
    print(f"finetune: wrote {out} (best epoch {result.metrics.get('best_epoch')} of "
          f"{result.metrics.get('epochs_run')})", flush=True)
    return str(out)
