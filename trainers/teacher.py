"""The teacher probe: does the LLM know something the SR model does not? (frozen stage 1 checkpoints)

    probe = teacher_probe("FEATURES", "ALIGNED", split="valid")
    # {"video": {"teacher": {"ndcg@10": .., ...}, "sr_stage1": {...}}, "paired": {...}, "slices": {...}, ...}

The teacher is the aligned LLM's own preference vector (the base LLM's last-prompt-token state, centred with
the task's train mean, through the preference adapter stage 1 trained); the student is the same checkpoint's
SR user vector of the task's head. Both score the example's candidates (target + the build's negatives; for
comments, without the user's other positives under that video, as evaluation does) against the stage 1 SR's
item vectors without age terms, so the two differ only in the user side. NDCG@10 per model, the paired
difference teacher - student with a 95% interval over users, and the cold-item / cold-user slices
(trainers/ranking.py). The LLM states of the split come from the same cached precompute as training's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.contract import TASKS
from core.paths import cache_dir
from core.runtime import init_ray
from features.folder import FeaturesFolder
from trainers.align import LLM_DIR, STATE_COLUMN, STATE_MEANS, AlignConfig, precompute_states, read_states
from trainers.checkpoint import TRAIN, load_model, read_weights
from trainers.data import collate, item_time_tensors, text_tensors, user_video_positives, without_later_positives
from trainers.metrics import nonfinite_examples, ranks_from_scores
from trainers.ranking import SLICES, Ranking, cold_slices, paired, task_results

TEACHER, STUDENT = "teacher", "sr_stage1"


def _adapter(aligned: Path) -> torch.nn.Linear:
    weights = read_weights(aligned / LLM_DIR / "preference_adapter.safetensors")
    adapter = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    adapter.load_state_dict(weights)
    return adapter.eval()


@torch.no_grad()
def rank_teacher(folder: FeaturesFolder, sr, adapter: torch.nn.Linear, mean: np.ndarray, rows: dict, task: str,
                 batch_size: int = 256) -> Ranking:
    """Ranks of the target for the teacher and the student on the example rows of one task (with llm_state)."""
    if task == "comment":
        rows = without_later_positives(rows, user_video_positives(folder, ("train", "valid", "test")))
    keep = np.array([len(n) > 0 for n in rows["negatives"]])
    skipped = int((~keep).sum())
    rows = {k: v[keep] for k, v in rows.items()}
    video_ts, comment_ts = folder.item_times()
    item_ts = video_ts if task == "video" else comment_ts
    trained = np.zeros(len(item_ts), bool)
    trained[folder.examples_table(task, "train", ["target"])["target"].to_numpy()] = True
    ranks: dict[str, list] = {TEACHER: [], STUDENT: []}
    nonfinite = dict.fromkeys(ranks, 0)
    for start in range(0, len(rows["target"]), batch_size):
        part = {k: v[start: start + batch_size] for k, v in rows.items()}
        batch = collate(part, sr.config.size.max_history)
        states = torch.from_numpy(np.stack(list(part[STATE_COLUMN])).astype(np.float32) - mean)
        users = {TEACHER: F.normalize(adapter(states), dim=-1),
                 STUDENT: sr.stage1_vectors(batch, batch["query_video"] if task == "comment" else None)[
                     f"{task}_head"]}
        candidates = torch.cat([batch["target"][:, None], batch["negatives"]], 1)  # [B, 1 + K]
        keys = sr.timeless_item_vectors(task, candidates.clamp(min=0))  # [B, 1 + K, H]
        valid = (batch["negatives"] >= 0).numpy()
        for name, user in users.items():
            scores = torch.einsum("bh,bnh->bn", user, keys).double().numpy()
            ranks[name].append(ranks_from_scores(scores[:, 0], scores[:, 1:], valid))
            nonfinite[name] += nonfinite_examples(scores[:, 0], scores[:, 1:], valid)
    slices = cold_slices(rows, task, item_ts, trained)
    return Ranking(task=task, user_id=rows["user_id"], candidates=np.array([1 + len(n) for n in rows["negatives"]]),
                   slices={s: slices[s] for s in SLICES},
                   ranks={name: np.concatenate(r) if r else np.zeros(0, np.int64) for name, r in ranks.items()},
                   nonfinite=nonfinite, skipped=skipped)


def teacher_probe(features: str | Path, aligned: str | Path, split: str = "valid", max_examples: int = 0) -> dict:
    """Teacher against student on `split` for both tasks (module docstring); max_examples > 0 samples that many
    examples per task (seeded, as stage 1's sample)."""
    aligned = Path(aligned)
    info = json.loads((aligned / TRAIN).read_text())
    if info.get("mode") != "frozen":
        raise ValueError(f"{aligned}: the teacher probe reads a frozen-mode stage 1 checkpoint, got {info.get('mode')}")
    config = AlignConfig(**{**info["align_config"], "max_examples": max_examples})
    folder = FeaturesFolder.open(features)
    _, sr = load_model(aligned)
    sr.set_text_tables(*text_tensors(folder))
    sr.set_item_times(*item_time_tensors(folder))
    adapter = _adapter(aligned)
    means = {task: m.numpy() for task, m in read_weights(aligned / LLM_DIR / STATE_MEANS).items()}
    init_ray()
    folders = precompute_states(config, folder, info["llm_path"], list(TASKS), cache_dir(), split=split)
    out: dict = {"split": split, "checkpoint": str(aligned), "paired": {}, "slices": {}}
    for task in TASKS:
        ranking = rank_teacher(folder, sr, adapter, means[task], read_states(folders[task]), task)
        out[task] = task_results(ranking)
        out["paired"][task] = paired(ranking, [STUDENT])
        out["slices"][task] = {s: task_results(ranking, mask=ranking.slices[s]) for s in SLICES}
    return out
