"""What both training stages share on Ray Train: the `Recipe` base class of trainers/align.py (stage 1) and
trainers/finetune.py (stage 2), torchtune-recipe style.

    config, metrics = FinetuneRecipe.launch(config)   # driver: returns once config.out holds the checkpoint

Driver (`Recipe.launch`): set-up (the subclass's `prepare`: features folder, Ray Data datasets, what the
workers need), train (a TorchTrainer: config.num_workers workers of one CPU, plus one GPU with use_gpu; torch
backend nccl on GPUs, gloo on CPUs; FailureConfig(max_failures); the latest checkpoint kept), save (the final
checkpoint's OUTPUTS copied into config.out) and clean-up (the Ray Train storage, a temporary folder unless
config.storage_path names one).

Worker (`Recipe.run`, the Ray Train loop function): the subclass's set-up (models, optimizer, resume), train
and save (at each checkpoint), on what the base class gives every stage alike:
- rank, world size, device, the features folder on this node and the dataset shards;
- joint batches: one batch of each task per step, every worker taking the same number of steps;
- AdamW over the trainable parameters, whose gradients are averaged by hand rather than by DDP: a step may use
  only part of the model (one task's shard ran out, or a worker has no batch left), the models are called
  through several methods rather than forward(), and a frozen LLM base must not cross the wire;
- resume: after a worker failure Ray Train restarts the workers, and `restored()` gives the folder of the last
  reported checkpoint; the optimizer state is stored as flat safetensors tensors (no pickle on disk);
- `report`: every worker reports its metrics, rank 0 also a checkpoint written into a temporary folder;
- `fail_once_at_step` (tests only): one injected worker failure.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.contract import TASKS
from features.folder import FeaturesFolder
from trainers.checkpoint import read_weights, write_tensors

INJECTED_FAILURE = ".injected_failure"  # marker in the output folder: the test failure has happened
OPTIMIZER, STATE = "optimizer.safetensors", "state.json"  # beside the weights a resumed run continues from


# ---- collectives (the identity in a single process) -----------------------------------------------------


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `tensor` in place over every worker; returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def any_worker(flag: bool, device: torch.device) -> bool:
    return bool(all_reduce(torch.tensor([float(flag)], device=device), dist.ReduceOp.MAX).item())


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _views(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Slices of one flat buffer shaped like params."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def trainable(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values of params on every worker (one flat buffer)."""
    if not _distributed():
        return
    flat = torch.cat([p.data.reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    for p, value in zip(params, _views(flat, params)):
        p.data.copy_(value)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of params over the workers (one flat buffer); a parameter this step did not
    reach has no gradient and counts as zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if _distributed():
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        flat /= dist.get_world_size()
        grads = _views(flat, params)
    for p, grad in zip(params, grads):
        p.grad = grad


# ---- optimizer state and failure injection --------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat safetensors-ready tensors "<param index>.<name>"; the
    hyper-parameters come from the config on load."""
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


def write_training_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.safetensors (the AdamW moments) and state.json (step, epoch, ...) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(folder / OPTIMIZER, optimizer_tensors(optimizer))
    (folder / STATE).write_text(json.dumps(state) + "\n")


def read_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Load what write_training_state wrote (the optimizer state only when the file is there); returns the
    state."""
    if (folder / OPTIMIZER).is_file():
        load_optimizer_tensors(optimizer, read_weights(folder / OPTIMIZER))
    return json.loads((folder / STATE).read_text())


def inject_failure(config: Any, step: int, rank: int) -> None:
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


# ---- Ray Train ------------------------------------------------------------------------------------------


def train_counts(folder: FeaturesFolder) -> dict[str, int]:
    """Train examples per task; ValueError when neither task has any."""
    counts = {task: folder.count_examples(task, "train") for task in TASKS}
    if not any(counts.values()):
        raise ValueError(f"{folder}: no train examples for either task")
    return counts


def joint_batches(shards: dict, batch_size: int, shuffle_buffer: int, seed: int, device: torch.device):
    """Pairs (video rows | None, comment rows | None) until every worker has run out of both tasks (the
    shorter task gives None for the rest of the epoch). All workers take the same number of steps, as the
    gradient all-reduce needs."""
    iters = {
        task: iter(shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed if shuffle_buffer else None))
        for task, shard in shards.items()
    }
    while True:
        got = {task: next(it, None) for task, it in iters.items()}
        if not any_worker(any(rows is not None for rows in got.values()), device):
            return
        yield got.get("video"), got.get("comment")


@contextlib.contextmanager
def restored() -> Iterator[Path | None]:
    """The folder of the checkpoint this run resumes from (after a worker failure), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def _copy_outputs(checkpoint: Path, out: Path, names: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        source, target = checkpoint / name, out / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        elif source.is_file():
            shutil.copy2(source, target)


class Recipe:
    """One training stage. Subclasses set `name` and `OUTPUTS` and define `prepare` (driver), `setup`,
    `train` and `save` (workers); their configs have the fields read here (out, seed, batch_size,
    shuffle_buffer, lr, weight_decay, max_grad_norm, fail_once_at_step, num_workers, use_gpu, max_failures,
    storage_path)."""

    name = "train"  # progress lines and Ray Train run names
    OUTPUTS: tuple[str, ...] = ()  # files and folders of the final checkpoint copied to config.out

    # ---- driver ----------------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, config) -> tuple[Any, dict, dict]:
        """(config with resolved paths, Ray Data datasets by task, keyword arguments of the workers' recipe)."""
        raise NotImplementedError

    @classmethod
    def launch(cls, config) -> tuple[Any, dict]:
        """Set-up, train, save and clean-up on the driver (module docstring); returns (the resolved config,
        the final metrics)."""
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        config, datasets, inputs = cls.prepare(config)
        (Path(config.out) / INJECTED_FAILURE).unlink(missing_ok=True)
        storage_path = config.storage_path or tempfile.mkdtemp(prefix=f"lsvcr-{cls.name}-")
        resources = {"CPU": 1, "GPU": 1} if config.use_gpu else {"CPU": 1}
        try:
            result = TorchTrainer(
                cls.run, train_loop_config={"config": config, "tasks": list(datasets), **inputs},
                scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                                       resources_per_worker=resources),
                torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
                run_config=ray.train.RunConfig(
                    name=f"{cls.name}-{int(time.time())}", storage_path=storage_path,
                    failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
                datasets=datasets,
            ).fit()
            if result.checkpoint is None:
                raise RuntimeError(f"{cls.name}: training ended without a checkpoint")
            with result.checkpoint.as_directory() as checkpoint:
                _copy_outputs(Path(checkpoint), Path(config.out), cls.OUTPUTS)
        finally:
            if not config.storage_path:
                shutil.rmtree(storage_path, ignore_errors=True)
        return config, result.metrics

    # ---- workers ---------------------------------------------------------------------------------------

    @classmethod
    def run(cls, loop_config: dict) -> None:
        """The Ray Train loop function: the recipe built from train_loop_config, set up, trained."""
        recipe = cls(**loop_config)
        recipe.setup()
        recipe.train()

    def __init__(self, config, folder: FeaturesFolder, tasks: list[str]):
        import ray.train
        import ray.train.torch

        torch.set_num_threads(1)
        self.config = config
        self.folder = folder.on_this_node()
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shards = {task: ray.train.get_dataset_shard(task) for task in tasks}
        self.step = 0  # global optimizer steps, resumed ones included

    def setup(self) -> None:
        raise NotImplementedError

    def train(self) -> None:
        raise NotImplementedError

    def init_optimizer(self, *modules: torch.nn.Module, lr_scale: dict | None = None) -> None:
        """AdamW over the trainable parameters of modules; lr_scale (parameter -> factor) gives some of them
        config.lr x factor."""
        self.params = trainable(*modules)
        groups: dict[float, list] = {}
        for p in self.params:
            groups.setdefault((lr_scale or {}).get(p, 1.0), []).append(p)
        self.optimizer = torch.optim.AdamW([{"params": ps, "lr": self.config.lr * f} for f, ps in groups.items()],
                                           lr=self.config.lr, weight_decay=self.config.weight_decay)

    def start(self) -> None:
        """After set-up and resume: rank 0's weights everywhere, then a random stream per worker and per resume
        (dropout masks differ between workers, and a resumed run does not repeat the masks it already used)."""
        broadcast_parameters(self.params)
        torch.manual_seed(self.config.seed + 1 + self.rank + 1000 * self.step)

    def batches(self, epoch: int):
        c = self.config
        return joint_batches(self.shards, c.batch_size, c.shuffle_buffer, c.seed + epoch, self.device)

    def optimizer_step(self, loss: torch.Tensor | None) -> None:
        """Backward (when there is a loss), gradients averaged over the workers, clipped, one AdamW step."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None and loss.requires_grad:
            loss.backward()
        average_gradients(self.params)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        inject_failure(self.config, self.step, self.rank)

    def report(self, metrics: dict, write: Callable[[Path], None]) -> None:
        """Every worker reports metrics; rank 0 also the checkpoint write(folder) puts in a temporary folder."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
