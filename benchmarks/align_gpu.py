"""Stage 1 in LoRA mode on one accelerator, without Ray, and its quality effect (issue 18, item 8).

    python -m benchmarks.align_gpu stage1 features=F out=O llm=SmolLM2.gguf|HF_FOLDER [seeds=3 ...]
    python -m benchmarks.align_gpu stage2 features=F aligned=O work=W [seeds=3]

`stage1` runs where the GPU is (a machine with torch, transformers, peft and pyarrow, but no Ray): for every
variant and seed it trains the SR model and the LLM side with trainers/align.py's own step (`stage1_losses`,
`total_loss`) in one process, and writes each result with `save_aligned` to O/<variant>@seed<k> (its train.json
holds tokens/s, examples/s, steps, the device and the LLM's compute dtype). Variants: `lora` (SmolLM2 + LoRA, the LM
loss and every contrast) and `none` (the rec losses alone: the sr_rec_pretrain control over the very same
examples, order and steps). The schedule is the CPU quality run's: one epoch over a seeded sample of
`max_examples` train examples per task, 128 examples per task and step (2 workers x 64 there).

    python -m benchmarks.align_gpu tables features=F llm_features=L aligned=O minilm_models=M work=W [seeds=3]

`tables` (issue 18 item 1 with LoRA, as the paper does it) reads `lora` runs whose stage 1 read the base LLM's
item tables (L: the same event log built with encoder=llm). Per seed it re-embeds L's titles and comments with
that run's aligned LLM (`lora:<run>/llm/lora`, features/reembed.py) and fine-tunes `lsvcr_lora_tables` over
those tables; beside it `lsvcr_lora_base_tables` (the same stage 1, stage 2 over L's base tables: what the
re-export adds), `sr_rec_pretrain_llm` and `sr_no_align_llm` (the controls over L's tables, stage 1 `none` run
here over the same examples, order and steps). The MiniLM models M/sr_rec_pretrain@seed<k> and
M/sr_no_align@seed<k> (an earlier `stage2` work folder: the product's models) are evaluated with them on F's
test split, each model with its own tables (trainers/evaluate.py `tables`); writes W/quality_gpu_lora_tables.json.

`stage2` runs here on Ray: stage 2 (trainers/finetune.py, as lsvcr.suite trains it) from each aligned folder
(`lsvcr_lora`, `sr_rec_pretrain`) and sr_no_align beside them, every model under each seed, then one evaluation
on the test split with the paired intervals of trainers/ranking.py; writes W/quality_gpu_lora.json. With several
`init_lr_scales` (e.g. 1,0.3,0.1: the stage 2 learning rate of what stage 1 trained, as a factor) each aligned
model is trained under each, and the one with the best valid NDCG@10 (mean of both tasks and the seeds) goes
to test.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from core.config import load_config, parse_overrides
from core.contract import TASKS
from features.embeddings import LORA_PREFIX
from features.folder import FeaturesFolder
from features.reembed import reembed
from trainers.align import (
    AlignConfig,
    _build_llm_side,
    _keep_events,
    sample_event_ids,
    save_aligned,
    stage1_losses,
    stage1_sr,
    total_loss,
)
from trainers.evaluate import evaluate, format_table, rank_all, score_fns
from trainers.finetune import FinetuneConfig, finetune
from trainers.models.llm import DEFAULT_LLM, ItemTexts, resolve_llm_path
from trainers.ranking import paired, results_of

STAGE1 = {"features": "", "out": "", "llm": "default", "variants": "lora,none", "seeds": 3, "first_seed": 0,
          "epochs": 1, "max_examples": 10_000, "batch_size": 128, "max_prompt_tokens": 256, "limit_steps": 0}
STAGE2 = {"features": "", "aligned": "", "work": "", "seeds": 3, "init_lr_scales": "1"}
TABLES = {"features": "", "llm_features": "", "aligned": "", "minilm_models": "", "work": "", "seeds": 3}
NAMES = {"lora": "lsvcr_lora", "none": "sr_rec_pretrain"}  # variant -> model name in the evaluation


def _options(defaults: dict, args: list[str]) -> dict:
    given = parse_overrides(args)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise SystemExit(f"align_gpu: unknown options {unknown}; known: {sorted(defaults)}")
    opts = {**defaults, **given}
    for key, value in defaults.items():
        opts[key] = type(value)(opts[key])
    missing = [k for k, v in opts.items() if v == ""]
    if missing:
        raise SystemExit(f"align_gpu: {missing} required")
    return opts


def train_rows(folder: FeaturesFolder, task: str, max_examples: int) -> dict[str, np.ndarray]:
    """The task's train examples (the seeded sample every CPU run takes) as one numpy batch."""
    table = folder.examples_table(task, "train")
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    sample = sample_event_ids(folder, task, "train", max_examples)
    return rows if sample is None else _keep_events(rows, sample)


def joint_batches(rows: dict[str, dict], batch_size: int, seed: int):
    """(video rows | None, comment rows | None) in a seeded global shuffle, until both tasks run out."""
    rng = np.random.default_rng(seed)
    orders = {task: rng.permutation(len(r["target"])) for task, r in rows.items()}
    steps = max(-(-len(o) // batch_size) for o in orders.values())
    for step in range(steps):
        out = []
        for task in TASKS:
            idx = orders[task][step * batch_size: (step + 1) * batch_size]
            out.append({k: v[idx] for k, v in rows[task].items()} if len(idx) else None)
        yield tuple(out)


def train_one(config: AlignConfig, folder: FeaturesFolder, rows: dict, llm_path: str | None, device: torch.device,
              limit_steps: int) -> dict:
    """One stage 1 run in this process (the step of AlignRecipe.train_epoch, one worker); returns its figures."""
    torch.manual_seed(config.seed)
    sr = stage1_sr(config, folder).to(device)
    hidden = 0
    if llm_path:
        hidden = json.loads((Path(llm_path) / "config.json").read_text())["hidden_size"]
    llm = _build_llm_side(config, llm_path, hidden, device)
    texts = ItemTexts.from_folder(folder) if config.mode == "lora" else None
    params = [p for m in (sr, llm) if m is not None for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    torch.manual_seed(config.seed + 1)
    sr.train()
    if llm is not None:
        llm.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    step, examples, tokens, sums, history = 0, 0, 0.0, {}, []
    started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        for video, comment in joint_batches(rows, config.batch_size, config.seed + epoch):
            with autocast:
                losses = stage1_losses(sr, llm, {"video": video, "comment": comment}, config, texts, device)
                tokens += float(losses.pop("tokens", torch.zeros(())))
                loss = total_loss(losses, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            step += 1
            examples += sum(len(r["target"]) for r in (video, comment) if r is not None)
            for name, value in {"total": loss, **losses}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if step % config.log_every == 0 or step == 1:
                print(f"align_gpu: {config.llm_mode} seed {config.seed} epoch {epoch} step {step} "
                      + " ".join(f"{k} {float(v.detach()):.4f}" for k, v in losses.items())
                      + f" {examples / (time.monotonic() - started):.1f} examples/s", flush=True)
            if limit_steps and step >= limit_steps:
                break
        history.append({f"{k}_loss": v / max(step, 1) for k, v in sums.items()})
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.monotonic() - started
    figures = {"mode": config.mode, "seed": config.seed, "torch": torch.__version__, "step": step, "epochs": config.epochs,
               "examples": examples, "train_s": round(train_s, 2),
               "examples_per_s": round(examples / train_s, 1), "tokens_per_s": round(tokens / train_s, 1),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "llm_compute": "bfloat16 autocast over float32 weights" if device.type == "cuda" else "float32",
               "history": history}
    if device.type == "cuda":
        figures["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    save_aligned(Path(config.out), sr.cpu(), llm.cpu() if llm is not None else None, config,
                 {"align_config": {k: str(v) for k, v in vars(config).items()}, **figures})
    return figures


def stage1(args: list[str]) -> dict:
    opts = _options(STAGE1, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = FeaturesFolder(opts["features"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    variants = opts["variants"].split(",")
    llm_path = str(resolve_llm_path(opts["llm"])) if "lora" in variants else None
    rows = {task: train_rows(folder, task, opts["max_examples"]) for task in TASKS}
    print(f"align_gpu: {device}, train examples {({t: len(r['target']) for t, r in rows.items()})}", flush=True)
    runs = {}
    for variant in variants:
        for seed in range(opts["first_seed"], opts["first_seed"] + opts["seeds"]):
            config = AlignConfig(features=str(folder.root), out=str(out / f"{variant}@seed{seed}"),
                                 llm=llm_path or "default", llm_mode=variant, epochs=opts["epochs"],
                                 max_examples=opts["max_examples"], batch_size=opts["batch_size"],
                                 max_prompt_tokens=opts["max_prompt_tokens"], num_workers=1,
                                 use_gpu=device.type == "cuda", seed=seed)
            runs[f"{variant}@seed{seed}"] = train_one(config, folder, rows, llm_path if variant == "lora" else None,
                                                      device, opts["limit_steps"])
            print(f"align_gpu: {variant}@seed{seed}: {json.dumps({k: v for k, v in runs[f'{variant}@seed{seed}'].items() if k != 'history'})}",
                  flush=True)
    return runs


def _scaled(name: str, scale: float) -> str:
    return name if scale == 1.0 else f"{name}_lr{scale:g}"


def stage2(args: list[str]) -> dict:
    opts = _options(STAGE2, args)
    aligned, work, seeds = Path(opts["aligned"]), Path(opts["work"]), range(opts["seeds"])
    scales = [float(x) for x in opts["init_lr_scales"].split(",")]

    def trained(name: str, seed: int, variant: str | None, scale: float) -> str:
        target = work / f"{_scaled(name, scale)}@seed{seed}"
        if not (target / "model.safetensors").is_file():
            values = {"features": opts["features"], "out": str(target), "seed": seed, "num_workers": 2}
            if variant:
                values.update(init=str(aligned / f"{variant}@seed{seed}"), init_lr_scale=scale)
            print(f"align_gpu: stage 2 for {target.name}", flush=True)
            finetune(load_config(FinetuneConfig, None, values))
        return str(target)

    # Each stage-1 model's init_lr_scale (FinetuneConfig: the learning rate of what stage 1 trained) is chosen
    # on the valid split, by its mean NDCG@10 over the seeds and both tasks; test sees only the chosen ones.
    chosen, valid = {name: scales[0] for name in NAMES.values()}, None
    if len(scales) > 1:
        candidates = {f"{_scaled(name, scale)}@seed{seed}": trained(name, seed, variant, scale)
                      for variant, name in NAMES.items() for scale in scales for seed in seeds}
        valid = evaluate(opts["features"], candidates, split="valid", popularity=False)
        for name in chosen:
            score = {scale: sum(valid[task][_scaled(name, scale)]["ndcg@10"] for task in TASKS) / len(TASKS)
                     for scale in scales}
            chosen[name] = max(score, key=score.get)
            print(f"align_gpu: {name}: valid NDCG@10 by init_lr_scale {score} -> {chosen[name]}", flush=True)
    checkpoints = {}
    for seed in seeds:
        for variant, name in NAMES.items():
            checkpoints[f"{name}@seed{seed}"] = trained(name, seed, variant, chosen[name])
        checkpoints[f"sr_no_align@seed{seed}"] = trained("sr_no_align", seed, None, 1.0)
    metrics = {"seeds": opts["seeds"], **evaluate(opts["features"], checkpoints, split="test")}
    gpu = {}
    for variant in NAMES:
        for seed in seeds:
            info = json.loads((aligned / f"{variant}@seed{seed}" / "train.json").read_text())
            gpu[f"{variant}@seed{seed}"] = {k: v for k, v in info.items() if k not in ("align_config", "history")}
    result = {"stage1_gpu": gpu, "init_lr_scale": chosen, "metrics": metrics, "table": format_table(metrics)}
    if valid is not None:
        result["valid_ndcg@10"] = {task: {m: v["ndcg@10"] for m, v in valid[task].items() if "ndcg@10" in v}
                                   for task in TASKS}
    (work / "quality_gpu_lora.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"], flush=True)
    return result


def local_adapter(run: Path) -> Path:
    """run/llm/lora with its base pointed at this machine's conversion of the packaged GGUF: the GPU converted
    a copy of the same file, and a conversion's folder name ends in the GGUF's content digest."""
    adapter = run / "llm" / "lora"
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    recorded, local = Path(config["base_model_name_or_path"]), resolve_llm_path(DEFAULT_LLM)
    if not recorded.exists():
        if recorded.name.rsplit("-", 1)[-1] != local.name.rsplit("-", 1)[-1]:
            raise SystemExit(f"align_gpu: {adapter} was trained over {recorded}, not the packaged SmolLM2")
        config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(local)}, indent=2) + "\n")
    return adapter


def tables(args: list[str]) -> dict:
    opts = _options(TABLES, args)
    aligned, work, seeds = Path(opts["aligned"]), Path(opts["work"]), range(opts["seeds"])
    llm_features, minilm = opts["llm_features"], Path(opts["minilm_models"])
    work.mkdir(parents=True, exist_ok=True)
    lora_runs = {seed: json.loads((aligned / f"lora@seed{seed}" / "train.json").read_text()) for seed in seeds}
    if any(not (aligned / f"none@seed{seed}" / "model.safetensors").is_file() for seed in seeds):
        first = lora_runs[0]["align_config"]
        stage1([f"features={llm_features}", f"out={aligned}", "variants=none", f"seeds={opts['seeds']}",
                f"max_examples={first['max_examples']}", f"batch_size={first['batch_size']}"])
    checkpoints, model_tables = {}, {}

    def trained(name: str, seed: int, features: str, init: Path | None) -> str:
        target = work / f"{name}@seed{seed}"
        if not (target / "model.safetensors").is_file():
            values = {"features": features, "out": str(target), "seed": seed, "num_workers": 2}
            if init:
                values["init"] = str(init)
            print(f"align_gpu: stage 2 for {target.name}", flush=True)
            finetune(load_config(FinetuneConfig, None, values))
        checkpoints[target.name] = str(target)
        model_tables[target.name] = features
        return str(target)

    reembedded = {}
    for seed in seeds:
        out = work / f"tables@seed{seed}"
        if not (out / "manifest.json").is_file():
            reembed(llm_features, out, encoder=f"{LORA_PREFIX}{local_adapter(aligned / f'lora@seed{seed}')}")
        reembedded[seed] = json.loads((out / "manifest.json").read_text())["embeddings"]
        trained("lsvcr_lora_tables", seed, str(out), aligned / f"lora@seed{seed}")
        trained("lsvcr_lora_base_tables", seed, llm_features, aligned / f"lora@seed{seed}")
        trained("sr_rec_pretrain_llm", seed, llm_features, aligned / f"none@seed{seed}")
        trained("sr_no_align_llm", seed, llm_features, None)
        for name in ("sr_rec_pretrain", "sr_no_align"):
            checkpoints[f"{name}@seed{seed}"] = str(minilm / f"{name}@seed{seed}")
    folder = FeaturesFolder.open(opts["features"])
    fns, _ = score_fns(folder, checkpoints, tables=model_tables)
    rankings = rank_all(folder, fns, "test")
    metrics = {"seeds": opts["seeds"], **results_of(rankings)}
    # What each step adds, on the same test users: the re-export over the base tables, and each LLM-table
    # model over its own control.
    extra = {"lsvcr_lora_tables": ["lsvcr_lora_base_tables", "sr_rec_pretrain_llm", "sr_no_align_llm"],
             "lsvcr_lora_base_tables": ["sr_rec_pretrain_llm"], "sr_rec_pretrain_llm": ["sr_no_align_llm"]}
    metrics["paired_within_llm_tables"] = {
        task: {model: paired(rankings[task], refs)[model] for model, refs in extra.items()} for task in TASKS}
    gpu = {f"lora@seed{seed}": {k: v for k, v in info.items() if k not in ("align_config",)}
           for seed, info in lora_runs.items()}
    result = {"stage1_gpu": gpu, "reembedded": reembedded, "metrics": metrics, "table": format_table(metrics)}
    (work / "quality_gpu_lora_tables.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"], flush=True)
    return result


COMMANDS = {"stage1": stage1, "stage2": stage2, "tables": tables}

if __name__ == "__main__":
    from core.runtime import setup_process

    setup_process()
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__)
    COMMANDS[sys.argv[1]](sys.argv[2:])
