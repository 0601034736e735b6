"""The continuous job's windows (lsvcr/continuous.py): when to train, the time bounds of a window over the
newest examples, the window folder cut from the features folder, the warm start that moves a model's ID tables
to a grown catalog, and whether a candidate is published. Pure functions and file steps; the job calls them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core import contract, storage
from core.contract import SPLITS, TASKS
from features.folder import FeaturesFolder
from trainers.checkpoint import WEIGHTS, read_weights
from trainers.finetune import FinetuneConfig, model_config
from trainers.models import build_model

METRIC = "ndcg@5"


def should_train(new_examples: int, minutes_since_last: float, every_examples: int,
                 every_minutes: float) -> str | None:
    """Why to train now ("examples" or "timer"), or None."""
    if new_examples >= every_examples:
        return "examples"
    if new_examples > 0 and every_minutes > 0 and minutes_since_last >= every_minutes:
        return "timer"
    return None


def window_bounds(video_ts: np.ndarray, window: int, valid: int, holdout: int,
                  min_train: int) -> dict | None:
    """Time bounds of a window over the video-task example times, or None when there are too few.

    The newest `holdout` examples are the test slice, the `valid` before them the valid slice, and up to
    `window` before those the train slice. Each slice is a half-open time range (lo, hi]; examples tied on
    a bound's time fall on its older side.
    """
    ts = np.sort(np.asarray(video_ts, dtype=np.int64))
    n = len(ts)
    if n < holdout + valid + min_train:
        return None
    test_from = int(ts[n - holdout - 1])
    valid_from = int(ts[n - holdout - valid - 1])
    first = n - holdout - valid - window - 1
    train_from = int(ts[first]) if first >= 0 else int(ts[0]) - 1
    return {"train_from": train_from, "valid_from": valid_from, "test_from": test_from, "cut": int(ts[-1])}


def split_of(ts: np.ndarray, bounds: dict) -> np.ndarray:
    """train / valid / test / "" (outside the window) for each example time."""
    ts = np.asarray(ts, dtype=np.int64)
    out = np.full(len(ts), "", dtype=object)
    out[(ts > bounds["train_from"]) & (ts <= bounds["valid_from"])] = "train"
    out[(ts > bounds["valid_from"]) & (ts <= bounds["test_from"])] = "valid"
    out[(ts > bounds["test_from"]) & (ts <= bounds["cut"])] = "test"
    return out


def mean_score(results: dict, name: str, metric: str = METRIC) -> float | None:
    """Mean of `metric` over the tasks where model `name` has a value (evaluate_fns output)."""
    values = [models[name][metric] for models in results.values()
              if name in models and models[name].get(metric) is not None]
    return float(np.mean(values)) if values else None


def publish_decision(candidate: float | None, serving: float | None, margin: float) -> tuple[bool, str]:
    """Publish unless the candidate is worse than the serving version by more than `margin`."""
    if candidate is None:
        return False, "no held-out example could be ranked"
    if serving is None:
        return True, "no serving version to compare with"
    if candidate < serving - margin:
        return False, (f"candidate {METRIC} {candidate:.4f} is below serving {serving:.4f} "
                       f"by more than the margin {margin}")
    return True, f"candidate {METRIC} {candidate:.4f} vs serving {serving:.4f} (margin {margin})"


def align_due(trained_cycles: int, align_every: int) -> bool:
    """Stage 1 runs before trained cycle number `trained_cycles` + 1 when that is a multiple of N."""
    return align_every > 0 and (trained_cycles + 1) % align_every == 0


def remap_rows(old: np.ndarray, old_ids: list[str], fresh: np.ndarray, new_ids: list[str]) -> np.ndarray:
    """Rows of an ID table [N_old, H] moved to the new catalog's order [N_new, H]; items the old table did not
    know keep their `fresh` rows."""
    if len(old_ids) != old.shape[0]:
        raise ValueError(f"old table has {old.shape[0]} rows for {len(old_ids)} ids")
    if len(new_ids) != fresh.shape[0]:
        raise ValueError(f"fresh table has {fresh.shape[0]} rows for {len(new_ids)} ids")
    position = {item: i for i, item in enumerate(old_ids)}
    out = fresh.copy()
    for j, item in enumerate(new_ids):
        i = position.get(item)
        if i is not None:
            out[j] = old[i]
    return out


# ------------------------------------------------------------------------------------------- files


def write_json_atomic(path: Path, obj) -> None:
    storage.write_text(str(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_example_ts(features: Path, task: str) -> np.ndarray:
    folder = features / "examples" / task / "train"
    if not folder.is_dir():
        return np.zeros(0, dtype=np.int64)
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["ts"])
    return table.column("ts").to_numpy().astype(np.int64)


def cut_window(features: Path, out: Path, bounds: dict) -> dict[str, dict[str, int]]:
    """A features folder (docs/DATA.md section 3) holding only this window's examples, split by `bounds`.

    Top-level files are copied, not linked: the incremental build rewrites them in place and a published
    version must keep the item tables it was trained with. Returns example counts per task and split."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in features.iterdir():
        if item.is_file() and not item.name.startswith((".", "_")):
            shutil.copy2(item, tmp / item.name)
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        counts[task] = {}
        source = features / "examples" / task / "train"
        table = pads.dataset(str(source), format="parquet").to_table() if source.is_dir() else None
        splits = split_of(table.column("ts").to_numpy(), bounds) if table is not None else None
        for split in SPLITS:
            folder = tmp / "examples" / task / split
            folder.mkdir(parents=True)
            if table is None:
                counts[task][split] = 0
                continue
            rows = table.filter(pa.array(splits == split))
            pq.write_table(rows, folder / "part-0.parquet")
            counts[task][split] = rows.num_rows
    manifest_path = tmp / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest["window"] = {**bounds, "counts": counts}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return counts


def warm_start(source_ckpt: Path, source_features: Path, window: Path, out: Path, finetune: FinetuneConfig) -> Path:
    """An init checkpoint for fine-tuning (`finetune`) on `window`: the source model's weights with its ID
    tables moved to the window's catalog (new items start from a fresh initialisation)."""
    import torch
    from safetensors.torch import save_file

    folder = FeaturesFolder(window)
    cfg = model_config(finetune, folder.num_videos, folder.num_comments, folder.text_dim)
    torch.manual_seed(0)
    fresh = build_model("sr", dataclasses.asdict(cfg)).state_dict()
    old = read_weights(source_ckpt / WEIGHTS)
    tables = {"video_id.weight": contract.VIDEOS, "comment_id.weight": contract.COMMENTS}
    tensors = {}
    for name, tensor in old.items():
        if name not in fresh:
            continue
        if name in tables:
            id_col = "video_id" if name == "video_id.weight" else "comment_id"
            old_ids = pq.read_table(source_features / tables[name], columns=[id_col]).column(0).to_pylist()
            new_ids = pq.read_table(window / tables[name], columns=[id_col]).column(0).to_pylist()
            tensor = torch.from_numpy(remap_rows(tensor.numpy(), old_ids, fresh[name].numpy(), new_ids))
        tensors[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS))
    return out
