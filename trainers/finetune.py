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

In-batch negatives are per worker for now (trainers/losses.py). `FinetuneRecipe` is the stage on the shared
Ray Train mechanics of trainers/loop.py (gradients averaged by hand, resume, checkpoint reports). Workers
memory-map the embeddings and rank 0 reads the valid split from the features folder: a path must be readable
by every worker (shared storage on a cluster); a URI (s3://...) is copied once per node into the cache
(features/folder.py), and the train split is read through it.

Stage 1 seam: `init` names an earlier checkpoint whose SR parameters are loaded (strict on names and
shapes) before training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional  # not `str | None`: core.config coerces typing.Optional only

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from core.config import require, require_at_least
from core.contract import TASKS
from core.runtime import init_ray
from features.folder import FeaturesFolder
from trainers.checkpoint import (
    CONFIG,
    TRAIN,
    WEIGHTS,
    load_init_weights,
    load_state,
    read_weights,
    save_checkpoint,
    write_tensors,
)
from trainers.data import (
    collate,
    fresh_video_negatives,
    item_time_tensors,
    text_tensors,
    user_video_positives,
    without_later_positives,
)
from trainers.evaluate import evaluate_fns, scorer_fn
from trainers.loop import (
    Recipe,
    all_reduce,
    any_worker,
    read_training_state,
    restored,
    train_counts,
    write_training_state,
)
from trainers.losses import comment_loss, id_text_loss, video_loss
from trainers.models import MODELS, SASRecConfig, SRConfig, TextRecommender
from trainers.models.base import ModelSize, has_time_features
from trainers.scoring import Scorer

RESUME = "resume"  # checkpoint subfolder: current weights, optimizer state, state.json
LOSS_NAMES = ("video", "comment", "id_text")


@dataclass
class FinetuneConfig:
    features: str  # features folder (docs/DATA.md section 3): a path (shared storage on a cluster) or a URI
    out: str  # checkpoint folder to write
    model: str = "sr"  # "sr" or "sasrec"
    text_only: bool = False  # SR without ID embeddings (the sr_text_only baseline)
    # Item-age and history-gap embeddings and the freshness score (SRConfig.time_features and freshness;
    # SASRecConfig.time_features)
    time_features: bool = True
    init: Optional[str] = None  # checkpoint folder whose SR weights start training (stage 1 output)
    epochs: int = 10
    patience: int = 2  # stop after this many epochs without a better valid NDCG@5
    batch_size: int = 256  # per worker and task
    lr: float = 1e-3
    # The learning rate of the parameters loaded from `init` is lr x init_lr_scale, so that stage 2 keeps
    # more of what stage 1 learned (chosen on the valid split: BENCHMARKS.md, quality).
    init_lr_scale: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 5.0  # 0 = no clipping
    id_text_weight: float = 0.1  # weight of the ID-text contrast (SR with ID embeddings)
    train_negatives: int = 20  # alive-pool negatives per video example, drawn each step, beside the in-batch ones
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
    size: ModelSize = field(default_factory=ModelSize)  # the paper's released configuration by default

    def __post_init__(self):
        require(self, bool(self.features), "features", "is required")
        require(self, bool(self.out), "out", "is required")
        require(self, self.model in MODELS, "model", f"must be one of {sorted(MODELS)}")
        for name in ("text_only", "init"):
            require(self, self.model == "sr" or not getattr(self, name), name, "applies to model='sr' only")
        require_at_least(self, 1, "epochs", "patience", "batch_size", "num_workers", "log_every")
        require_at_least(self, 0, "weight_decay", "max_grad_norm", "id_text_weight", "train_negatives",
                         "shuffle_buffer", "max_eval_examples", "max_failures", "fail_once_at_step",
                         "materialize_max_mb")
        require(self, self.lr > 0, "lr", "must be > 0")
        require(self, 0 < self.init_lr_scale <= 1, "init_lr_scale", "must be in (0, 1]")


def model_config(config: FinetuneConfig, num_videos: int, num_comments: int, text_dim: int):
    if config.model == "sasrec":
        return SASRecConfig(num_videos=num_videos, num_comments=num_comments, size=config.size,
                            time_features=config.time_features)
    return SRConfig(num_videos=num_videos, num_comments=num_comments, text_dim=text_dim, size=config.size,
                    use_id_embedding=not config.text_only, time_features=config.time_features,
                    freshness=config.time_features, id_shrinkage=not config.text_only, history_match=True)


# Columns holding video and comment indices, per task (the item indices that get gradients in training).
VIDEO_COLUMNS = {"video": ("target", "negatives", "hist_video", "hist_cmt_video"),
                 "comment": ("query_video", "hist_video", "hist_cmt_video")}
COMMENT_COLUMNS = {"video": ("hist_video_hot", "hist_cmt_comments"),
                   "comment": ("target", "negatives", "hist_video_hot", "hist_cmt_comments")}


def seen_items(folder: FeaturesFolder, num_videos: int, num_comments: int) -> tuple[np.ndarray, np.ndarray]:
    """Int64 counts [V], [C] of each item's appearances anywhere in the train examples (target, negatives,
    histories): the training signal its ID embedding got. Items at 0 are scored without their ID embedding;
    with SRConfig.id_shrinkage the others get count / (count + k) of it."""
    seen = {"video": np.zeros(num_videos, dtype=np.int64), "comment": np.zeros(num_comments, dtype=np.int64)}
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
                    seen[kind] += np.bincount(idx, minlength=len(seen[kind]))
    return seen["video"], seen["comment"]


# ---- the recipe ---------------------------------------------------------------------------------------


def _valid_score(results: dict) -> float | None:
    """Mean valid NDCG@5 over the tasks that have valid examples."""
    values = [m["model"]["ndcg@5"] for m in results.values() if m["model"]["ndcg@5"] is not None]
    return float(np.mean(values)) if values else None


class FinetuneRecipe(Recipe):
    """Stage 2: one model (SR or SASRec) on both tasks, validated by rank 0 after every epoch."""

    name = "finetune"
    OUTPUTS = (WEIGHTS, CONFIG, TRAIN)  # not resume/

    @classmethod
    def prepare(cls, config: FinetuneConfig) -> tuple[FinetuneConfig, dict, dict]:
        import ray.data

        folder = FeaturesFolder(config.features)  # a URI: downloaded once into the cache
        config = dataclasses.replace(config, features=folder.source, out=os.path.abspath(config.out),
                                     init=os.path.abspath(config.init) if config.init else None)
        counts = train_counts(folder)
        tasks = [task for task in TASKS if counts[task] > 0]
        seen = None
        if config.model == "sr" and not config.text_only:
            seen = seen_items(folder, folder.num_videos, folder.num_comments)
        print(f"finetune: model {config.model}, train examples {counts}, {folder.num_videos} videos, "
              f"{folder.num_comments} comments, {config.num_workers} workers", flush=True)
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
              f"{'streamed from Parquet every epoch' if stream else 'materialised once in the object store'}",
              flush=True)
        model_cfg = model_config(config, folder.num_videos, folder.num_comments, folder.text_dim)
        return config, datasets, {"folder": folder, "model_config": model_cfg, "seen": seen}

    def __init__(self, config: FinetuneConfig, folder: FeaturesFolder, tasks: list[str], model_config,
                 seen: tuple[np.ndarray, np.ndarray] | None):
        super().__init__(config, folder, tasks)
        self.model_config, self.seen = model_config, seen
        self.loss_weights = {"video": 1.0, "comment": 1.0, "id_text": config.id_text_weight}
        self.use_id_text = config.model == "sr" and not config.text_only and config.id_text_weight > 0

    def setup(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.model = MODELS[c.model][0](self.model_config)
        if self.seen is not None:
            self.model.set_seen(*(torch.tensor(counts) for counts in self.seen))
        transferred: dict = {}
        if c.init:
            fresh = load_init_weights(self.model, c.init)
            transferred = {p: c.init_lr_scale for n, p in self.model.named_parameters() if n not in fresh}
            if "video_id.weight" in fresh:
                self.model.zero_id_embeddings()  # start exactly at the stage 1 function (see SRModel)
            if self.rank == 0:
                print(f"finetune: loaded {c.init}; freshly initialised: {fresh}", flush=True)
        if isinstance(self.model, TextRecommender):
            self.model.set_text_tables(*text_tensors(self.folder))
        if has_time_features(self.model):
            self.model.set_item_times(*item_time_tensors(self.folder))
        self.model.to(self.device)
        # Training negatives: video ones drawn afresh each step from the alive pool; comment lists without
        # the user's other train positives on the video (the stored lists keep only the earlier ones out).
        self.comment_positives = user_video_positives(self.folder, ("train",)) if "comment" in self.shards else {}
        self.init_optimizer(self.model, lr_scale=transferred)
        state = self.resume()
        self.step, self.epoch, self.stale, self.best = state["step"], state["epoch"], state["stale"], state["best"]
        self.stopped, self.history, self.resumed_from = state["stopped"], state["history"], state["resumed_from"]
        self.started = time.monotonic() - state["train_s"]
        self.start()

    def resume(self) -> dict:
        """Fresh, or the last checkpoint's after a worker failure: current weights and AdamW moments on every
        rank; best weights, history and the early-stopping counter."""
        fresh = {"epoch": 0, "step": 0, "stale": 0, "stopped": False, "history": [], "train_s": 0.0,
                 "resumed_from": [], "best": {"score": -math.inf, "epoch": 0, "state": None, "valid": None}}
        with restored() as folder:
            if folder is None:
                return fresh
            load_state(self.model, read_weights(folder / RESUME / WEIGHTS), "resume weights")
            state = read_training_state(folder / RESUME, self.optimizer)
            info = json.loads((folder / TRAIN).read_text())
            best_state = read_weights(folder / WEIGHTS) if self.rank == 0 else None
        if self.rank == 0:
            print(f"finetune: resumed after epoch {state['epoch']} (step {state['step']})", flush=True)
        return {"epoch": state["epoch"], "step": state["step"], "stale": state["stale"], "stopped": state["stopped"],
                "history": info["history"], "train_s": info["train_s"],
                "resumed_from": state["resumed_from"] + [state["step"]],
                "best": {"score": state["best_score"], "epoch": info["best_epoch"], "state": best_state,
                         "valid": info["valid"]}}

    def train(self) -> None:
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            if self.stopped:
                break  # the failure came after the last epoch's checkpoint
            record = self.train_epoch(epoch)
            self.stopped = any_worker(self.rank == 0 and self.validate(record), self.device)
            self.history.append(record)
            self.save(epoch, record)

    def step_losses(self, video_rows: dict | None, comment_rows: dict | None,
                    rng: np.random.Generator) -> dict[str, torch.Tensor]:
        c, losses, targets = self.config, {}, {}
        for task, rows in (("video", video_rows), ("comment", comment_rows)):
            if rows is None:
                continue
            if task == "comment":
                rows = without_later_positives(rows, self.comment_positives)
            batch = collate(rows, c.size.max_history)
            if task == "video" and c.train_negatives > 0:
                lo, hi = self.folder.alive_bounds(rows["ts"])
                batch["negatives"] = fresh_video_negatives(lo, hi, rows["target"], c.train_negatives, rng)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            losses[task] = (video_loss(self.model, batch, c.train_negatives) if task == "video"
                            else comment_loss(self.model, batch))
            targets[task] = batch["target"]
        if self.use_id_text and losses:
            term = id_text_loss(self.model, targets.get("video"), targets.get("comment"), c.size.temperature)
            if term is not None:
                losses["id_text"] = term
        return losses

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the shards -> the epoch's record (mean losses over every worker, throughput)."""
        c, n = self.config, len(LOSS_NAMES)
        self.model.train()
        # Loss sums, loss counts, examples; kept on the device so steps need no extra synchronisation.
        sums = torch.zeros(2 * n + 1, dtype=torch.float64, device=self.device)
        epoch_start = time.monotonic()
        rng = np.random.default_rng([c.seed, epoch, self.rank])  # reproducible, new draws every epoch
        for video_rows, comment_rows in self.batches(epoch):
            losses = self.step_losses(video_rows, comment_rows, rng)
            self.optimizer_step(sum(self.loss_weights[name] * value for name, value in losses.items())
                                if losses else None)
            for i, name in enumerate(LOSS_NAMES):
                if name in losses:
                    sums[i] += losses[name].detach()
                    sums[n + i] += 1
            sums[-1] += sum(len(r["target"]) for r in (video_rows, comment_rows) if r is not None)
            if self.rank == 0 and self.step % c.log_every == 0:
                parts = " ".join(f"{k}_loss {v.item():.4f}" for k, v in losses.items())
                print(f"finetune: epoch {epoch} step {self.step} {parts}", flush=True)
        sums = all_reduce(sums).cpu()  # totals over workers
        epoch_s = time.monotonic() - epoch_start
        means = {f"{name}_loss": (float(sums[i] / sums[n + i]) if sums[n + i] else None)
                 for i, name in enumerate(LOSS_NAMES)}
        loss = sum(self.loss_weights[name] * means[f"{name}_loss"] for name in LOSS_NAMES
                   if means[f"{name}_loss"] is not None)
        return {"epoch": epoch, "step": self.step, "loss": loss, **means, "examples": int(sums[-1]),
                "epoch_s": round(epoch_s, 3), "examples_per_s": float(sums[-1]) / max(epoch_s, 1e-9)}

    def validate(self, record: dict) -> bool:
        """Rank 0: the valid metrics into record (same code as trainers/evaluate.py), the best weights so far
        kept; whether to stop early (patience)."""
        c, best = self.config, self.best
        scorer = Scorer.from_model(c.model, self.model, self.folder)
        valid = evaluate_fns(self.folder, {"model": scorer_fn(scorer)}, "valid", max_examples=c.max_eval_examples)
        self.model.train()
        score = _valid_score(valid)
        record["valid_ndcg@5"] = score
        record["valid"] = {task: valid[task]["model"] for task in valid}
        # Without valid examples every epoch counts as the best so far (the last one is kept).
        if score is None or score > best["score"]:
            best.update(score=-math.inf if score is None else score, epoch=record["epoch"], valid=record["valid"],
                        state={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})
            self.stale = 0
        else:
            self.stale += 1
        print(f"finetune: epoch {record['epoch']} done: " + " ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items() if k != "valid" and v is not None) + f" best_epoch {best['epoch']}",
            flush=True)
        return self.stale >= c.patience

    def save(self, epoch: int, record: dict) -> None:
        """Report the epoch; rank 0's checkpoint holds the best weights so far (the run's result) and resume/."""
        c, best = self.config, self.best
        metrics = {**{k: v for k, v in record.items() if k != "valid"}, "best_epoch": best["epoch"],
                   "epochs_run": len(self.history), "train_s": time.monotonic() - self.started}

        def write(folder: Path) -> None:
            train_info = {"finetune_config": dataclasses.asdict(c), "best_epoch": best["epoch"],
                          "epochs_run": len(self.history), "train_s": metrics["train_s"], "valid": best["valid"],
                          "history": self.history, "resumed_from": self.resumed_from, "workers": self.world}
            save_checkpoint(folder, c.model, self.model.config, best["state"], train_info)
            write_tensors(folder / RESUME / WEIGHTS, self.model.state_dict())
            write_training_state(folder / RESUME, self.optimizer, {
                "epoch": epoch, "step": self.step, "stale": self.stale, "best_score": best["score"],
                "stopped": self.stopped, "resumed_from": self.resumed_from})

        self.report(metrics, write)


def finetune(config: FinetuneConfig) -> str:
    """Train with Ray Train and write CKPT (model.safetensors, config.json, train.json) to config.out;
    returns that folder."""
    config, metrics = FinetuneRecipe.launch(config)
    print(f"finetune: wrote {config.out} (best epoch {metrics.get('best_epoch')} of "
          f"{metrics.get('epochs_run')})", flush=True)
    return config.out
