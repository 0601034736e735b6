"""Checkpoint folders (docs/DATA.md section 4): model.safetensors, config.json, train.json.

config.json is {"model": "sr" | "sasrec", "config": {fields of the model config dataclass, the model size
nested as "size"}}; one written before ModelSize, with the size fields at the top, is read as nested. Weights
are only ever read with safetensors; any problem (missing file, corrupt file, other architecture) raises
CheckpointError with the reason, so a caller such as serving can refuse the checkpoint and keep the old one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainers.models import MODELS, build_model
from trainers.models.base import nest_size

WEIGHTS, CONFIG, TRAIN = "model.safetensors", "config.json", "train.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt or does not fit the model."""


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file (CPU copies), written atomically."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))


def save_checkpoint(out_dir: str | Path, kind: str, model_config, state_dict: dict[str, torch.Tensor],
                    train_info: dict | None = None) -> Path:
    """Write the three files into out_dir (created if needed); returns the folder."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known: {sorted(MODELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(out / WEIGHTS, state_dict, metadata={"model": kind})
    config = {"model": kind, "config": dataclasses.asdict(model_config)}
    _write_atomic(out / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    if train_info is not None:
        _write_atomic(out / TRAIN, lambda p: p.write_text(json.dumps(train_info, indent=2) + "\n"))
    return out


def read_model_config(ckpt_dir: str | Path) -> tuple[str, dict]:
    """(model name, config fields, size nested) from CKPT/config.json."""
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
        kind, config = data["model"], data["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a checkpoint config ({{'model', 'config'}}): {err}") from None
    if kind not in MODELS or not isinstance(config, dict):
        raise CheckpointError(f"{path}: unknown model {kind!r}; known: {sorted(MODELS)}")
    return kind, nest_size(config)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {err}") from None


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, partial: bool = False) -> list[str]:
    """Copy tensors into model. Every tensor must exist in the model with the same shape; unless `partial`,
    every model tensor must be given. Returns the model tensors that were not given (kept as they are)."""
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(tensors) & set(own)) if tensors[k].shape != own[k].shape]
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if missing and not partial:
        problems.append(f"missing tensors {missing}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)
    return missing


def load_model(ckpt_dir: str | Path) -> tuple[str, nn.Module]:
    """(model name, model in eval mode on CPU with the checkpoint's weights)."""
    kind, config = read_model_config(ckpt_dir)
    try:
        model = build_model(kind, config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(ckpt_dir) / CONFIG}: bad model config: {err}") from None
    weights = Path(ckpt_dir) / WEIGHTS
    load_state(model, read_weights(weights), str(weights))
    return kind, model.eval()


def load_init_weights(model: nn.Module, init_dir: str | Path) -> list[str]:
    """Stage 1 -> stage 2 seam: load an earlier checkpoint's parameters into `model`, strict on names and
    shapes of what the file holds. Buffers (the `seen` masks) are not taken from it: they describe this
    run's training data. Tensors the file lacks (e.g. the ID embeddings of a stage 1 model without them) keep
    their fresh initialisation; their names are returned."""
    weights = Path(init_dir) / WEIGHTS
    tensors = read_weights(weights)
    buffers = {name for name, _ in model.named_buffers()}
    tensors = {k: v for k, v in tensors.items() if k not in buffers}
    missing = load_state(model, tensors, str(weights), partial=True)
    return [name for name in missing if name not in buffers]
