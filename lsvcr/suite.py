"""Train the baselines, the ablations and full LSVCR on one features folder, then evaluate them on one split.

    results = train_all("FEATURES", "RUN/models", models=MODEL_NAMES, align=["max_steps=500"],
                        finetune=["epochs=10"])
    # -> {"checkpoints": {name: folder}, "metrics": {"video": {name: {...}}, "comment": {...}}}

| name | what |
|---|---|
| popularity | no training: train-split counts (video), likes before t (comment) |
| sasrec | stage 2 only, IDs only |
| sr_no_align | the SR model, stage 2 only |
| sr_text_only | the SR model without ID embeddings, stage 2 only |
| sr_rec_pretrain | stage 1 with the rec losses only (no LLM), then stage 2: the control for lsvcr |
| sr_rec_item_pretrain | sr_rec_pretrain plus the item contrast against MiniLM's own vectors (no LLM): the control for the minilm_aligned item contrast |
| lsvcr_no_vc_contrast | stage 1 without the video-comment contrast, then stage 2 |
| lsvcr_no_time | full LSVCR without the item-age and history-gap embeddings (issue 8's ablation) |
| lsvcr | stage 1 (all losses), then stage 2 |

Every model sees the same features folder and splits. `align` / `finetune` are key=value overrides applied to
every stage 1 / stage 2 run; the model size (`size.hidden=128`, ...) given to either applies to both, which
must agree. Checkpoints go to OUT/<name> (stage 1 outputs to OUT/<name>_aligned); an existing checkpoint is
reused when `reuse` is set. A stage 1 with `export_item_tables=true` (LoRA) writes OUT/<name>_aligned/features,
the features with the aligned LLM's item tables; that model's stage 2 and evaluation read those tables.

With seeds=N > 1 every trained model is trained N times, stage 1 included, with seed=0..N-1 (named
"<name>@seed<k>", folders OUT/<name>@seed<k>); the results give each model's mean and standard deviation over
the seeds and its paired difference to sr_no_align with a 95% bootstrap interval over test users
(trainers/ranking.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from core.config import load_config, parse_overrides
from trainers.align import ALIGNED_FEATURES, AlignConfig
from trainers.align import align as run_align
from trainers.evaluate import evaluate
from trainers.finetune import FinetuneConfig
from trainers.finetune import finetune as run_finetune
from trainers.ranking import seed_name

# The model `lsvcr run` trains beside the baselines and the demo serves: on both quality sets (default and
# freshness, 3 seeds) it beats sr_no_align on video NDCG@10 (+0.009 to +0.025, intervals above 0) and ties it on
# comments, and lsvcr does not beat it on both tasks (BENCHMARKS.md, issue 18). Stage 1 without the LLM costs
# about a minute on the demo's data.
SERVED_MODEL = "sr_rec_pretrain"
MODEL_NAMES = ("popularity", "sasrec", "sr_no_align", "sr_text_only", "sr_rec_pretrain", "sr_rec_item_pretrain",
               "lsvcr_no_vc_contrast", "lsvcr_no_time", "lsvcr")
STAGE2 = {"sasrec": {"model": "sasrec"}, "sr_no_align": {}, "sr_text_only": {"text_only": True}, "sr_rec_pretrain": {},
          "sr_rec_item_pretrain": {}, "lsvcr_no_vc_contrast": {}, "lsvcr_no_time": {"time_features": False},
          "lsvcr": {}}
# sr_rec_pretrain differs from lsvcr only in the LLM: same stage 1 steps, rec losses, sample and stage 2.
# sr_rec_item_pretrain adds the item contrast without the LLM (its target: the features' own text vectors), so
# that a gain of item_contrast=true (minilm_aligned) can be told apart from extra training of the text adapters.
# Neither control has an LLM whose item tables it could export (export_item_tables).
STAGE1 = {"sr_rec_pretrain": {"llm_mode": "none", "item_contrast": False, "export_item_tables": False},
          "sr_rec_item_pretrain": {"llm_mode": "none", "item_contrast": True, "export_item_tables": False},
          "lsvcr_no_vc_contrast": {"vc_contrast": False},
          "lsvcr_no_time": {"time_features": False}, "lsvcr": {}}
# Stage 2 loads stage 1's weights strictly, so these must agree between the two stages: the nested model size
# (every `size.*` override) and the time embeddings.
SIZE_KEYS = ("size", "time_features")


def train_all(features: str | Path, out: str | Path, models: tuple[str, ...] | list[str] = MODEL_NAMES,
              align: list[str] | None = None, finetune: list[str] | None = None, split: str = "test",
              reuse: bool = False, seeds: int = 1) -> dict:
    """Train `models` (names from MODEL_NAMES), each under `seeds` seeds, and evaluate them with the baselines
    on `split`; also writes OUT/metrics.json. Returns {"checkpoints": {...}, "metrics": {...}}."""
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {list(MODEL_NAMES)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage1, stage2 = parse_overrides(align), parse_overrides(finetune)
    # Stage 2 loads stage 1's weights strictly: one set of model sizes for both.
    shared = {k: v for k, v in {**stage2, **stage1}.items() if k.split(".")[0] in SIZE_KEYS}
    checkpoints, tables = {}, {}
    for name in models:
        if name == "popularity":
            continue
        for seed in range(seeds):
            run = seed_name(name, seed) if seeds > 1 else name
            extra = {**shared, "seed": seed} if seeds > 1 else shared
            checkpoints[run], trained_on = _train_one(name, run, features, out, stage1, stage2, extra, reuse)
            if trained_on != str(features):
                tables[run] = trained_on
    metrics = {"seeds": seeds, **evaluate(features, checkpoints, split=split, popularity="popularity" in models,
                                          tables=tables)}
    result = {"split": split, "checkpoints": checkpoints, "metrics": metrics}
    if tables:
        result["tables"] = tables  # the models trained over stage 1's export of the aligned LLM's item tables
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _train_one(name: str, run: str, features: str | Path, out: Path, stage1: dict, stage2: dict, shared: dict,
               reuse: bool) -> tuple[str, str]:
    """Stage 1 (for the aligned models) and stage 2 of one model under one seed -> (its checkpoint folder, the
    features folder it was trained on: stage 1's export of the aligned LLM's item tables when it made one)."""
    target, aligned = out / run, out / f"{run}_aligned"
    done = reuse and (target / "model.safetensors").is_file()
    if not done and name in STAGE1 and not (reuse and (aligned / "model.safetensors").is_file()):
        config = load_config(AlignConfig, None, {**stage1, **shared, **STAGE1[name],
                                                 "features": str(features), "out": str(aligned)})
        print(f"suite: stage 1 for {run}", flush=True)
        run_align(config)
    # align() removes an earlier run's export first, so an export on disk is this stage 1's.
    exported = aligned / ALIGNED_FEATURES
    trained_on = str(exported) if name in STAGE1 and (exported / "manifest.json").is_file() else str(features)
    if done:
        return str(target), trained_on
    values = {**stage2, **shared, **STAGE2[name], "features": trained_on, "out": str(target)}
    if name in STAGE1:
        values["init"] = str(aligned)
    print(f"suite: stage 2 for {run}", flush=True)
    return run_finetune(load_config(FinetuneConfig, None, values)), trained_on
