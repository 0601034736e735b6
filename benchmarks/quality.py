"""`lsvcr benchmark quality`: every model of the suite on one generated dataset, through the whole pipeline.

generate (cached by users and seed) -> replay to Kafka -> consumer group -> event log -> Ray Data features ->
stage 1 with the real packaged SmolLM2 (frozen mode on CPU: the LLM vectors are precomputed once by Ray Data
batch inference, then the SR side is aligned to them) -> stage 2 for every model -> evaluation on the test
split. Nothing is tuned on test: early stopping and every tuned baseline look at the valid split only.

Overrides (key=value): users=2000 seed=0 (the generated data) seeds=3 (every trained model, stage 1 included,
trained with seeds 0..N-1 on the same features: means, standard deviations, paired 95% intervals over test users
against sr_no_align and every baseline) epochs=0 (stage 2 epochs, the best on valid NDCG@5 kept; 0: up to the
trainer's 10 with early stopping) align_examples=10000 (a seeded random sample of train examples per task that
get an LLM vector, computed once and shared by the seeds; 0 = all) align_epochs=1 align_batch_size=64 (per worker
and task) max_prompt_tokens=256 workdir=.run/quality models=all set=default. The split is the features
default, global_time: one time cut for all users and both tasks. Results keep the DESIGN.md section 10 shape,
plus "without_age_terms" (NDCG@10 of each time-aware checkpoint with its item-age terms zeroed), "stage1" (how
stage 1 ran) and "teacher_probe" (trainers/teacher.py on the valid split, the first lsvcr seed's stage 1).

set=freshness generates the data with configs/generate-freshness.yaml, a freshness-dominated feed where sorting
by date is a strong ranker, as on real forums (data-fresh-u{users}-s{seed}, work-fresh-..., quality_freshness.json
next to quality.json; `lsvcr benchmark` writes benchmarks/results/quality_freshness.json, same keys).
item_encoder=llm|minilm_aligned measures the other item encoders (ITEM_ENCODERS) into quality_<encoder>.json
(work-<encoder>-... folders); set= and item_encoder= combine (quality_freshness_llm.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.harness import ROOT, parse_overrides
from core.config import load_config
from core.paths import run_dir
from devtools.generator import GeneratorConfig, generate
from lsvcr.pipeline import PipelineConfig, run_pipeline
from lsvcr.suite import MODEL_NAMES
from trainers.evaluate import format_table, without_age_terms
from trainers.ranking import model_of, verdict
from trainers.teacher import STUDENT, TEACHER, teacher_probe

# One stage 2 epoch is 14 steps at 2,000 users: far too few (on the freshness set it lost to recency, 0.466 vs
# 0.605; BENCHMARKS.md), so early stopping decides by default.
DEFAULTS = {"users": 2_000, "seed": 0, "seeds": 3, "epochs": 0, "align_examples": 10_000, "align_epochs": 1,
            "align_batch_size": 64, "max_prompt_tokens": 256, "workdir": "", "models": "all", "set": "default",
            "item_encoder": "minilm"}
# What the item text tables are and how stage 1 treats them: (features overrides, stage 1 overrides). minilm:
# MiniLM tables; llm: the frozen SmolLM2's mean-pooled states as the tables (stage 1 then trains the SR's text
# adapters over them; serving embeds new items with the LLM through the features job); minilm_aligned: MiniLM
# tables with stage 1's item contrast against the LLM's item vectors (serving needs MiniLM alone).
ITEM_ENCODERS = {"minilm": ((), ()), "llm": (("encoder=llm",), ()), "minilm_aligned": ((), ("item_contrast=true",))}
# Set name -> (generator preset, None for the defaults; folder tag). The default set keeps the original folder
# names, so its cached data and work are reused; each other set has its own data, work and results file.
SETS = {"default": (None, ""), "freshness": (ROOT / "configs" / "generate-freshness.yaml", "fresh-")}


def _options(overrides: list[str]) -> dict:
    opts = parse_overrides("quality", DEFAULTS, overrides)
    if opts["set"] not in SETS:
        raise SystemExit(f"quality benchmark: set={opts['set']!r}; known: {sorted(SETS)}")
    if opts["item_encoder"] not in ITEM_ENCODERS:
        raise SystemExit(f"quality benchmark: item_encoder={opts['item_encoder']!r}; known: {sorted(ITEM_ENCODERS)}")
    return opts


def _suffix(opts: dict) -> str:
    """Results and work names of a variant: _<set> beside the default set, _<encoder> beside minilm."""
    return "".join(f"_{opts[key]}" for key, default in (("set", "default"), ("item_encoder", "minilm"))
                   if opts[key] != default)


def results_name(overrides: list[str]) -> str:
    """The results file's name for the harness: quality, or quality_<set> for another set."""
    return "quality" + _suffix(_options(overrides))


def run(overrides: list[str]) -> dict:
    opts = _options(overrides)
    root = Path(opts["workdir"] or run_dir() / "quality")
    preset, tag = SETS[opts["set"]]
    suffix = _suffix(opts)
    features, item_align = ITEM_ENCODERS[opts["item_encoder"]]
    name = f"u{opts['users']}-s{opts['seed']}"
    data = root / f"data-{tag}{name}"
    if not (data / "comment_events.jsonl").exists():
        print(f"[quality] generating {opts['users']} users (set={opts['set']}) into {data}", flush=True)
        generate(str(data), load_config(GeneratorConfig, preset,
                                        {"users": opts["users"], "seed": opts["seed"]}))
    models = MODEL_NAMES if opts["models"] == "all" else tuple(opts["models"].split(","))
    align = (f"max_examples={opts['align_examples']}", f"epochs={opts['align_epochs']}",
             f"batch_size={opts['align_batch_size']}", f"max_prompt_tokens={opts['max_prompt_tokens']}",
             "llm_mode=frozen", *item_align)
    started = time.monotonic()
    encoder_tag = "" if opts["item_encoder"] == "minilm" else f"{opts['item_encoder']}-"
    out = run_pipeline(PipelineConfig(data=str(data), work=str(root / f"work-{tag}{encoder_tag}{name}"),
                                      results=str(root / f"results{suffix}.json"), epochs=opts["epochs"] or None,
                                      models=models, align=align, features=features, seeds=opts["seeds"]))
    metrics = out["results"]
    manifest = out["manifest"]
    figures = {
        **metrics,
        "users": opts["users"],
        "set": opts["set"],
        "train_video_examples": manifest["tasks"]["video"]["train"]["count"],
        "train_comment_examples": manifest["tasks"]["comment"]["train"]["count"],
        "item_encoder": opts["item_encoder"],
        "stage1": stage1_record(opts, manifest, out["checkpoints"]),
        "stage2_epochs": opts["epochs"] or "up to 10, early stopping on valid NDCG@5",
        "pipeline_s": round(time.monotonic() - started, 1),
    }
    # How much of each score the item-age terms carry: the same checkpoints with them zeroed.
    figures["without_age_terms"] = without_age_terms(out["features"], out["checkpoints"], tables=out["tables"])
    figures["teacher_probe"] = probe_teacher(out["features"], out["checkpoints"])
    figures["notes"] = ("Test split (global_time). Video: the target among the sampled candidates of the protocol named in "
                        "the table; comment: among the other comments under the same video that existed then.\n\n"
                        "```\n" + format_table(metrics) + "\n" + age_terms_table(metrics, figures["without_age_terms"])
                        + teacher_table(figures["teacher_probe"]) + "```")
    (root / f"quality{suffix}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def stage1_record(opts: dict, manifest: dict, checkpoints: dict) -> dict:
    """How stage 1 ran (DESIGN.md section 10, quality): mode, LLM, item encoder, examples per task, steps."""
    train = {task: manifest["tasks"][task]["train"]["count"] for task in ("video", "comment")}
    cap = opts["align_examples"]
    record = {"mode": "frozen", "llm": "SmolLM2-135M-Instruct (packaged GGUF)", "item_encoder": opts["item_encoder"],
              "examples_per_task": {task: min(n, cap) if cap else n for task, n in train.items()},
              "epochs": opts["align_epochs"], "batch_size_per_worker_and_task": opts["align_batch_size"],
              "max_prompt_tokens": opts["max_prompt_tokens"]}
    for name, folder in checkpoints.items():
        info = Path(f"{folder}_aligned") / "train.json"
        if info.is_file():  # the aligned models' stage 1 steps, per run
            record.setdefault("steps", {})[name] = json.loads(info.read_text()).get("step")
    return record


def probe_teacher(features: str, checkpoints: dict) -> dict | None:
    """The teacher probe (trainers/teacher.py) on the valid split for the first lsvcr run's stage 1."""
    runs = sorted(name for name in checkpoints if model_of(name) == "lsvcr")
    if not runs:
        return None
    return {"run": runs[0], **teacher_probe(features, f"{checkpoints[runs[0]]}_aligned", split="valid")}


def teacher_table(probe: dict | None) -> str:
    if not probe:
        return ""
    lines = [f"\nteacher probe ({probe['split']} split, stage 1 of {probe['run']}): NDCG@10 of the LLM's own "
             "preference vector vs the stage 1 SR head, same candidates and item vectors"]
    for task in ("video", "comment"):
        diff = probe["paired"][task][TEACHER][STUDENT]
        lines.append(f"{task:8s} teacher {probe[task][TEACHER]['ndcg@10']:.4f}  sr_stage1 "
                     f"{probe[task][STUDENT]['ndcg@10']:.4f}  diff {diff['diff']:+.4f} "
                     f"[{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}] {verdict(diff)}")
    return "\n".join(lines) + "\n"


def age_terms_table(metrics: dict, zeroed: dict) -> str:
    """NDCG@10 with and without the item-age terms (age table and freshness score), per task and model."""
    lines = []
    for task, models in zeroed.items():
        lines.append(f"{task} task: NDCG@10 with and without the item-age terms")
        width = max([len("model"), *(len(m) for m in models)])
        lines.append(f"{'model':<{width}}  {'full':>7}  {'no age':>7}")
        for model, value in models.items():
            full = metrics[task][model]["ndcg@10"]
            lines.append(f"{model:<{width}}  {full:>7.4f}  {value:>7.4f}")
        lines.append("")
    return "\n".join(lines)
