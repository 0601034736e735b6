"""`lsvcr benchmark train`: stage 1 and stage 2 throughput and peak memory, for 1 and 2 Ray Train workers.

Steps, all in one run:
1. a generated dataset (devtools.generator, `users` users) written as an event log and built into features
   with the hash encoder (benchmarks/features.py does the same; cached under WORKDIR by users and seed);
2. stage 1 in frozen mode with the real packaged SmolLM2-135M-Instruct: the Ray Data precompute of the LLM
   states is timed on its own (align_tokens_per_s = prompt tokens / s through the LLM), then the Ray Train
   loop for `align_steps` steps (align_examples_per_s, from the run's train.json);
3. optionally stage 1 in LoRA mode for `lora_steps` steps (the LLM forward and backward in every step;
   lora_examples_per_s, lora_tokens_per_s); 0 skips it;
4. stage 2 (the SR model, `finetune_epochs` epochs) from the frozen stage 1 checkpoint:
   finetune_examples_per_s is train examples / train-loop seconds of the first epoch (valid evaluation not
   included).
Steps 2-4 run once per worker count in `workers`. Before them, the precompute's two paths side by side on the
same `compare_examples` examples per task: today's (float32, Ray batches of 16) and the fast one (the dtype
`auto` picks, bfloat16 on this CPU, Ray batches of 256 run as length-grouped forwards): prompt tokens/s, states/s
and the cosine of each example's state to float32's (precompute_*). Peak memory sums RSS over this process and every
descendant (Ray head, raylet, workers), sampled every 0.5 s.

The defaults finish in about half an hour on 2 cores: the frozen precompute runs SmolLM2 at roughly 2 prompts/s
there, and one LoRA step of 2 + 2 examples takes about 2 minutes.

Overrides: users=2000 seed=0 workdir=/tmp/lsvcr_bench_train workers=1,2 align_steps=20 align_batch=8
lora_steps=2 lora_batch=2 finetune_epochs=1 finetune_batch=256 max_prompt_tokens=256 compare_examples=200
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.features import PeakRss, dataset, write_eventlog
from benchmarks.harness import parse_overrides
from core.contract import TASKS
from core.paths import cache_dir
from core.runtime import init_ray
from features.build import build_features
from features.config import FeaturesConfig
from features.folder import FeaturesFolder
from trainers.align import AlignConfig, align, precompute_states, read_states
from trainers.finetune import FinetuneConfig, finetune
from trainers.models.llm import inference_dtype, resolve_llm_path

DEFAULTS = {"users": 2000, "seed": 0, "workdir": "/tmp/lsvcr_bench_train", "workers": "1,2", "align_steps": 20,
            "align_batch": 8, "lora_steps": 2, "lora_batch": 2, "finetune_epochs": 1, "finetune_batch": 256,
            "max_prompt_tokens": 256, "compare_examples": 200}
# The precompute as it was before the fast path (float32, 16 examples a batch) and as it is by default.
PRECOMPUTE_PATHS = {"float32": {"llm_dtype": "float32", "inference_batch_size": 16},
                    "fast": {"llm_dtype": "auto", "inference_batch_size": AlignConfig.inference_batch_size}}


def options(overrides: list[str]) -> dict:
    opts = parse_overrides("train", DEFAULTS, overrides)
    workers = [int(w) for w in str(opts["workers"]).split(",") if w.strip()]
    if not workers or min(workers) < 1:
        raise SystemExit(f"train benchmark: workers must be a comma-separated list of counts >= 1, got "
                         f"{opts['workers']!r}")
    opts["workers"] = workers
    return opts


def build_dataset(work: Path, users: int, seed: int) -> Path:
    """Generated log -> features folder (hash encoder); reused when its manifest exists."""
    features = work / f"features-{users}-{seed}"
    if (features / "manifest.json").is_file():
        return features
    data, eventlog = work / f"gen-{users}-{seed}", work / "eventlog"
    dataset(data, users, seed)
    shutil.rmtree(eventlog, ignore_errors=True)
    write_eventlog(data, eventlog)
    build_features(FeaturesConfig(eventlog=str(eventlog), out=str(features), encoder="hash", encoder_dim=64,
                                  embed_cache="off"))
    return features


def _states(folders: dict[str, str]) -> dict[str, np.ndarray]:
    """Every task's states, sorted by event id (both precompute paths then line up row by row)."""
    parts = [read_states(f, ["event_id", "llm_state", "llm_tokens"]) for f in folders.values()]
    event_id = np.concatenate([p["event_id"] for p in parts])
    order = np.argsort(event_id, kind="stable")
    return {"event_id": event_id[order],
            "state": np.concatenate([np.asarray(p["llm_state"], np.float32) for p in parts])[order],
            "tokens": np.concatenate([p["llm_tokens"] for p in parts])[order]}


def compare_precompute(features: Path, work: Path, opts: dict) -> dict:
    """Both precompute paths (PRECOMPUTE_PATHS) on the same sample, in a cache of their own, fresh each."""
    folder = FeaturesFolder(features)
    tasks = [t for t in TASKS if folder.count_examples(t, "train") > 0]
    llm_path = str(resolve_llm_path("default"))
    figures, states = {}, {}
    for name, path in PRECOMPUTE_PATHS.items():
        config = AlignConfig(features=str(features), out="unused", llm_mode="frozen",
                             max_prompt_tokens=opts["max_prompt_tokens"], max_examples=opts["compare_examples"],
                             **path)
        started = time.perf_counter()
        folders = precompute_states(config, folder, llm_path, tasks, work / f"compare-{name}", fresh=True)
        seconds = time.perf_counter() - started
        states[name] = _states(folders)
        figures[f"precompute_tokens_per_s_{name}"] = round(int(states[name]["tokens"].sum()) / seconds, 1)
        figures[f"precompute_states_per_s_{name}"] = round(len(states[name]["tokens"]) / seconds, 2)
    slow, fast = states["float32"], states["fast"]
    if not np.array_equal(slow["event_id"], fast["event_id"]):
        raise RuntimeError("the two precompute paths read different examples")
    cosine = (slow["state"] * fast["state"]).sum(1) / (
        np.linalg.norm(slow["state"], axis=1) * np.linalg.norm(fast["state"], axis=1))
    figures["precompute_cosine_min"] = round(float(cosine.min()), 5)
    figures["precompute_cosine_mean"] = round(float(cosine.mean()), 5)
    figures["precompute_speedup"] = round(figures["precompute_tokens_per_s_fast"]
                                          / figures["precompute_tokens_per_s_float32"], 2)
    figures["precompute_fast_dtype"] = str(inference_dtype("auto")).replace("torch.", "")
    figures["precompute_examples"] = len(fast["tokens"])
    return figures


def _train_info(folder: Path) -> dict:
    return json.loads((folder / "train.json").read_text())


def measure(features: Path, work: Path, workers: int, opts: dict) -> dict:
    """Figures for one worker count, keys suffixed _w<workers>."""
    tag, out = f"_w{workers}", work / f"runs-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    figures = {}
    frozen = AlignConfig(features=str(features.resolve()), out=str(out / "aligned"), llm_mode="frozen",
                         max_steps=opts["align_steps"], batch_size=opts["align_batch"], num_workers=workers,
                         max_prompt_tokens=opts["max_prompt_tokens"], checkpoint_every=10**9,
                         log_every=max(1, opts["align_steps"] // 4),
                         # enough examples for the steps on every worker, not the whole train split
                         max_examples=opts["align_steps"] * opts["align_batch"] * workers)
    tasks = [t for t in TASKS if FeaturesFolder(features).count_examples(t, "train") > 0]
    started = time.perf_counter()
    # Into the cache that align() reads, so that it trains on these states instead of computing them again.
    folders = precompute_states(frozen, FeaturesFolder(features), str(resolve_llm_path(frozen.llm)), tasks, cache_dir(),
                                fresh=True)
    precompute_s = time.perf_counter() - started
    written = _states(folders)
    tokens, states = int(written["tokens"].sum()), len(written["tokens"])
    figures[f"align_llm_precompute_s{tag}"] = round(precompute_s, 2)
    figures[f"align_tokens_per_s{tag}"] = round(tokens / precompute_s, 1)
    figures[f"align_llm_states_per_s{tag}"] = round(states / precompute_s, 2)
    align(frozen)  # reuses the states just written
    info = _train_info(Path(frozen.out))
    figures[f"align_examples_per_s{tag}"] = round(info["examples_per_s"], 1)
    figures[f"align_steps{tag}"] = info["step"]

    if opts["lora_steps"] > 0:
        lora = AlignConfig(features=str(features), out=str(out / "aligned-lora"), llm_mode="lora",
                           max_steps=opts["lora_steps"], batch_size=opts["lora_batch"], num_workers=workers,
                           max_prompt_tokens=opts["max_prompt_tokens"], checkpoint_every=10**9, log_every=1,
                           max_examples=opts["lora_steps"] * opts["lora_batch"] * workers)
        align(lora)
        info = _train_info(Path(lora.out))
        figures[f"lora_examples_per_s{tag}"] = round(info["examples_per_s"], 2)
        figures[f"lora_tokens_per_s{tag}"] = round(info["tokens_per_s"], 1)

    ckpt = finetune(FinetuneConfig(features=str(features), out=str(out / "lsvcr"), init=frozen.out,
                                   epochs=opts["finetune_epochs"], patience=opts["finetune_epochs"],
                                   batch_size=opts["finetune_batch"], num_workers=workers, max_eval_examples=2000))
    first = _train_info(Path(ckpt))["history"][0]
    figures[f"finetune_examples_per_s{tag}"] = round(first["examples_per_s"], 1)
    figures[f"finetune_epoch_s{tag}"] = first["epoch_s"]
    return figures


def run(overrides: list[str]) -> dict:
    opts = options(overrides)
    work = Path(opts["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    init_ray()
    features = build_dataset(work, opts["users"], opts["seed"])
    manifest = json.loads((features / "manifest.json").read_text())
    figures: dict = {"users": opts["users"], "workers": ",".join(map(str, opts["workers"]))}
    if opts["compare_examples"]:
        figures.update(compare_precompute(features, work, opts))
    peaks = {}
    for workers in opts["workers"]:
        print(f"train benchmark: {workers} worker(s)", flush=True)
        with PeakRss() as rss:
            figures.update(measure(features, work, workers, opts))
        peaks[workers] = rss.peak_gb
        figures[f"peak_rss_gb_w{workers}"] = rss.peak_gb
    most = max(opts["workers"])
    # The DESIGN.md keys: the figures of the largest worker count.
    for key in ("align_examples_per_s", "align_tokens_per_s", "finetune_examples_per_s"):
        figures[key] = figures[f"{key}_w{most}"]
    figures["peak_rss_gb"] = max(peaks.values())
    counts = {task: {split: v["count"] for split, v in splits.items()} for task, splits in manifest["tasks"].items()}
    figures["notes"] = (
        f"Generated {opts['users']}-user dataset (examples {json.dumps(counts)}), hash text embeddings. "
        f"Stage 1 is frozen mode with the packaged SmolLM2-135M-Instruct: align_tokens_per_s is the Ray Data "
        f"precompute of the LLM states (prompt tokens through the LLM per second, prompts cut at "
        f"{opts['max_prompt_tokens']} tokens, one actor), align_examples_per_s the Ray Train loop over "
        f"{opts['align_steps']} steps of {opts['align_batch']} video + {opts['align_batch']} comment examples per "
        f"worker (SR model + preference adapter, all-gathered negatives). "
        + (f"lora_* figures: LoRA mode, the LLM forward and backward in every step, {opts['lora_steps']} steps of "
           f"{opts['lora_batch']} + {opts['lora_batch']} examples per worker. " if opts["lora_steps"] else "")
        + f"Stage 2: SR model from the stage 1 checkpoint, batch {opts['finetune_batch']} per task and worker, "
        f"first epoch's train loop (valid evaluation excluded), examples read through get_dataset_shard "
        f"(materialised once below FinetuneConfig.materialize_max_mb on disk, streamed from Parquet above). "
        f"align_llm_precompute_s includes the Ray Data actor start and the LLM load. "
        f"Suffix _wN: N Ray Train workers, each one CPU of Ray's and one torch thread, so 1 worker uses one of "
        f"the 2 cores and 2 workers use both: w2 over w1 is the data-parallel scaling at a fixed per-worker "
        f"batch (all-gather included). The precompute is one Ray Data actor with every core either way, over "
        f"as many examples as the workers then train on. "
        f"peak_rss_gb sums RSS over this process and its descendants (shared pages counted more than once). "
        + (f"precompute_*: the two precompute paths on the same {figures['precompute_examples']} train examples "
           f"(a seeded sample of {opts['compare_examples']} per task), one after the other in this run, each "
           f"fresh and timed from the Ray Data job's start (actor start and LLM load included): float32 in Ray "
           f"batches of 16 (the path before) against {figures['precompute_fast_dtype']} in batches of "
           f"{AlignConfig.inference_batch_size} run as length-grouped forwards; precompute_cosine_* compares each "
           f"example's state between the two." if opts["compare_examples"] else ""))
    return figures
