"""`lsvcr benchmark features`: the Ray Data feature build on a generated 100k-user log, against one process.

Steps, all in one run:
1. generate the dataset (devtools.generator; cached under WORKDIR by users and seed, ~2.5 min the first time);
2. write it as an event log (EVENTLOG/<table>/date=YYYY-MM-DD/part-*.parquet in ingestion.schema.ARROW_SCHEMA, read back
   through ingestion.eventlog.EventLog to check the counts) - no Kafka: this measures features only;
3. the single-process baseline (benchmarks.pandas_features.build_pandas: the same sequence build written plainly
   in pandas, no Ray) on the same tables, timed, its rows written to WORKDIR/baseline/ and freed before Ray starts;
4. the Ray Data build (build_features) with the hash encoder, its embedding cache off, so that build_s is the
   sequence build plus a cheap embedding pass; its rows are compared with the baseline's, one split at a time;
5. MiniLM throughput on a sample of real catalog texts (Ray Data actor pool, cache off);
6. the embedding comparison (`embed_comparison`, run first, before Ray starts): today's default MiniLM against
   the path before length-aware batching and bfloat16, on the generator's short texts and on a long-tailed set.

`part=embed` runs step 6 alone, in this process and without Ray (the encoder object the Ray actor holds, on all
cores), and merges its keys into the existing results file, keeping the build's keys.

Peak memory is the largest sum of RSS over this process and all its descendants (the Ray head, raylet and
workers), sampled every 0.5 s (shared object-store pages can be counted more than once: an upper bound).

Overrides: users=100000 seed=0 workdir=/tmp/lsvcr_bench embed_sample=20000 part=all|embed embed_texts=4000
embed_rounds=2.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from benchmarks.harness import ROOT, parse_overrides
from benchmarks.pandas_features import build_pandas
from core.contract import SPLITS, TASKS
from core.runtime import init_ray
from devtools.generator import STYLES, TOPICS, GeneratorConfig, comment_text, generate, video_tags, video_title
from features.build import build_features
from features.catalog import video_text
from features.config import FeaturesConfig
from features.embeddings import EmbedBatch, embed_texts, shortest_first
from features.stage_b import global_cuts
from ingestion.eventlog import EventLog
from ingestion.schema import ARROW_SCHEMA, TABLES

ROWS_PER_PART = 250_000


DEFAULTS = {"users": 100_000, "seed": 0, "workdir": "/tmp/lsvcr_bench", "embed_sample": 20_000, "part": "all",
            "embed_texts": 4000, "embed_rounds": 2}
PARTS = ("all", "embed")
# Where the text of the notes about the embedding comparison starts (part=embed replaces it, keeps the rest).
EMBED_NOTES = "Embedding comparison:"


class PeakRss:
    """Samples the total RSS of this process and its descendants in a thread; `peak_gb` is the largest.

    It also adds up their CPU time over the window (`cpu_s`, user + system; a process that exits between two
    samples loses at most its last 0.5 s): wall time on a shared machine depends on the other load, CPU time
    much less.
    """

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        import psutil

        me = psutil.Process(os.getpid())
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                times = proc.cpu_times()
                self._cpu_last[proc.pid] = times.user + times.system
            except psutil.Error:
                pass  # a worker that exited between listing and reading
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._total()
        self._cpu_start = dict(self._cpu_last)  # processes started later count from 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._total())

    @property
    def peak_gb(self) -> float:
        return round(self.peak / 2**30, 3)

    @property
    def cpu_s(self) -> float:
        return round(sum(t - self._cpu_start.get(pid, 0.0) for pid, t in self._cpu_last.items()), 2)


def dataset(folder: Path, users: int, seed: int) -> dict:
    """The generator's JSONL files for (users, seed), generated once and reused."""
    counts = folder / "counts.json"
    if not counts.exists():
        print(f"features benchmark: generating {users} users into {folder}", flush=True)
        result = generate(folder, GeneratorConfig(users=users, seed=seed))
        counts.write_text(json.dumps(result))
    return json.loads(counts.read_text())


def write_eventlog(data: Path, eventlog: Path) -> dict[str, pa.Table]:
    """JSONL -> EVENTLOG/<table>/part-*.parquet (contract schema); returns the tables, checked via EventLog."""
    tables = {}
    for name in TABLES:
        schema = ARROW_SCHEMA[name]
        table = pajson.read_json(data / f"{name}.jsonl", parse_options=pajson.ParseOptions(explicit_schema=schema))
        table = table.select(schema.names).cast(schema)
        # Hive-style date partitions, as the ingestion stage writes them (UTC day of the event time).
        dates = pa.compute.strftime(table["ts"].cast(pa.timestamp("ms", tz="UTC")), format="%Y-%m-%d")
        for date in sorted(pa.compute.unique(dates).to_pylist()):
            part = table.filter(pa.compute.equal(dates, date))
            folder = eventlog / name / f"date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            for n, start in enumerate(range(0, len(part), ROWS_PER_PART)):
                pq.write_table(part.slice(start, ROWS_PER_PART), folder / f"part-{n:05d}.parquet")
        if EventLog(eventlog).count(name) != len(table):
            raise RuntimeError(f"event log {name}: wrote {len(table)} rows, EventLog counts {EventLog(eventlog).count(name)}")
        tables[name] = table
    return tables


def write_baseline(local: dict[str, pa.Table], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in local.items():
        pq.write_table(table, folder / f"{name.replace('/', '-')}.parquet")


def same_rows(out: Path, baseline: Path) -> list[str]:
    """The (task/split or users) tables whose rows differ between the build and the baseline; [] when none."""
    differ = []
    for name, key in [*((f"{t}/{s}", "event_id") for t in TASKS for s in SPLITS), ("users", "user_id")]:
        got = pq.read_table(out / "users.parquet" if name == "users" else out / "examples" / name)
        want = pq.read_table(baseline / f"{name.replace('/', '-')}.parquet")
        if not got.select(want.column_names).cast(want.schema).sort_by(key).equals(want.sort_by(key)):
            print(f"features benchmark: rows differ in {name}", flush=True)
            differ.append(name)
    return differ


def embed_throughput(texts: list[str], folder: Path) -> float:
    started = time.perf_counter()
    embed_texts(texts, folder / "sample_emb.npy", encoder="minilm", batch_size=256, label="sample texts")
    return len(texts) / (time.perf_counter() - started)


def short_texts(n: int, seed: int) -> list[str]:
    """n distinct texts as the generator writes them: one in 16 a video's title and tags (its catalog has 15
    background comments per video), the others comments."""
    rng = np.random.default_rng(seed)
    texts: dict[str, None] = {}  # insertion-ordered set
    while len(texts) < n:
        topic = TOPICS[rng.integers(len(TOPICS))]
        if rng.random() < 1 / 16:
            texts[video_text(video_title(topic, rng)[0], video_tags(topic, rng))] = None
        else:
            texts[comment_text(topic, int(rng.integers(len(STYLES))), rng)[0]] = None
    return list(texts)


def long_tailed_texts(n: int, seed: int) -> list[str]:
    """n texts with the length spread of real comments, from the generator's words: word counts log-normal with
    median 30 and 5% over 150 (sigma = ln 5 / 1.645); each text is a run of one topic's and style's generated
    comments cut to its count."""
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, np.rint(rng.lognormal(np.log(30), np.log(5) / 1.645, size=n))).astype(int)
    texts = []
    for count in counts:
        topic, style = TOPICS[rng.integers(len(TOPICS))], int(rng.integers(len(STYLES)))
        words: list[str] = []
        while len(words) < count:
            words += comment_text(topic, style, rng)[0].split()
        texts.append(" ".join(words[:count]))
    return texts


def ray_batches(texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Row indices of the batches the encoder actor gets from _embed_with_ray: sorted by characters, then cut."""
    order = shortest_first(texts)
    return [order[i:i + batch_size] for i in range(0, len(texts), batch_size)]


def embed_comparison(n: int, rounds: int, seed: int) -> dict:
    """texts/s and tokens/s of the default MiniLM actor against the path before issue 19, in this process."""
    batch_size = FeaturesConfig.embed_batch_size  # the default Ray batch
    fast = EmbedBatch("minilm")  # the actor _embed_with_ray starts, with all cores
    float32 = EmbedBatch("minilm-float32")

    def before(texts: list[str]) -> np.ndarray:
        # MiniLMEncoder.encode before length-aware batching: one float32 forward over the whole Ray batch.
        return float32.encoder.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False)

    paths = {"_before": before, "_float32": lambda texts: float32.encoder.encode(texts),
             "": lambda texts: fast({"idx": np.arange(len(texts)), "text": np.asarray(texts)})["emb"]}
    sets = {"short": short_texts(n, seed), "long": long_tailed_texts(n, seed)}
    figures, cosines, loads = {}, [], []
    for set_name, texts in sets.items():
        batches = ray_batches(texts, batch_size)
        tokens = int(fast.encoder.model.preprocess(texts)["attention_mask"].sum())  # real tokens, <= 256 a text
        for encode in paths.values():
            encode(texts[:32])  # warm-up: first calls load kernels
        seconds, cpu_seconds, vectors = dict.fromkeys(paths, float("inf")), dict.fromkeys(paths, float("inf")), {}
        for _ in range(rounds):
            for path, encode in paths.items():
                loads.append(os.getloadavg()[0])
                out = np.zeros((len(texts), 384), np.float32)
                started, cpu_started = time.perf_counter(), time.process_time()
                for rows in batches:
                    out[rows] = encode([texts[i] for i in rows])
                seconds[path] = min(seconds[path], time.perf_counter() - started)
                cpu_seconds[path] = min(cpu_seconds[path], time.process_time() - cpu_started)
                vectors[path] = out
            print(f"features benchmark: embed {set_name}: "
                  + ", ".join(f"{p or '_default'} {len(texts) / s:.1f} texts/s" for p, s in seconds.items()), flush=True)
        for path, s in seconds.items():
            figures[f"embed_texts_per_s_{set_name}{path}"] = round(len(texts) / s, 1)
            figures[f"embed_tokens_per_s_{set_name}{path}"] = round(tokens / s, 1)
        figures[f"embed_ratio_{set_name}"] = round(seconds["_before"] / seconds[""], 3)
        figures[f"embed_cpu_ratio_{set_name}"] = round(cpu_seconds["_before"] / cpu_seconds[""], 3)
        figures[f"embed_tokens_mean_{set_name}"] = round(tokens / len(texts), 1)
        cosines.append(float((vectors[""] * vectors["_before"]).sum(1).min()))
    words = np.array([len(t.split()) for t in sets["long"]])
    return {
        **figures,
        "embed_cosine_min": round(min(cosines), 5),
        "embed_compare_texts": n,
        "embed_long_words_median": float(np.median(words)),
        "embed_long_share_over_150_words": round(float((words > 150).mean()), 4),
        "embed_load_avg_1m": round(max(loads), 2),
        "notes": (
            f"{EMBED_NOTES} in this process without Ray, on all cores, in the batches the Ray actor gets "
            f"(texts sorted by characters, {batch_size} a batch, as _embed_with_ray sends them), best of {rounds} "
            f"rounds over {n} texts a set. embed_texts_per_s_SET_before: the path before issue 19 (float32 "
            "SentenceTransformer.encode of each whole batch, every text padded to the batch's longest); "
            "..._float32: length-aware batching in float32 (encoder minilm-float32); no suffix: the default "
            "encoder minilm (length-aware batching, bfloat16), embed_ratio_SET = default / before. short: distinct "
            "generator texts (one in 16 a video title with tags, the rest comments); long: generated comment words "
            f"in log-normal lengths (median {np.median(words):.0f} words, {(words > 150).mean():.1%} over 150; "
            "MiniLM reads at most 256 tokens). Tokens/s count real tokens, padding excluded. embed_cosine_min: the "
            "smallest cosine between a default vector and the before path's float32 vector, both sets. "
            "embed_cpu_ratio_SET: the same ratio in this process's CPU seconds, which other load moves less. "
            "embed_load_avg_1m: the largest 1-minute load average seen during the comparison (a shared machine)."
        ),
    }


def previous_build() -> dict:
    """The other keys of the existing results file, for part=embed to keep, with the run that made them."""
    path = ROOT / "benchmarks" / "results" / "features.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    # The harness stamps this run's command, commit and time on the file; the build's own go to build_run.
    if "build_run" not in previous and "git_commit" in previous:
        command = previous.get("command", "lsvcr benchmark features")  # files from before commands were recorded
        previous["build_run"] = f"{command} at {previous['git_commit']} on {previous['when']}"
    for key in ("command", "machine", "git_commit", "when"):
        previous.pop(key, None)
    previous["notes"] = previous.get("notes", "").split(EMBED_NOTES)[0].strip()
    return previous


def run(overrides: list[str]) -> dict:
    opts = parse_overrides("features", DEFAULTS, overrides)
    if opts["part"] not in PARTS:
        raise SystemExit(f"features benchmark: part={opts['part']!r}; known: {', '.join(PARTS)}")
    # First, before any Ray process runs beside it.
    embed = embed_comparison(opts["embed_texts"], opts["embed_rounds"], opts["seed"])
    if opts["part"] == "embed":
        previous = previous_build()
        return {**previous, **embed, "notes": f"{previous['notes']} {embed['notes']}".strip()}
    work = Path(opts["workdir"])
    data = work / f"gen-{opts['users']}-{opts['seed']}"
    counts = dataset(data, opts["users"], opts["seed"])
    eventlog, out = work / "eventlog", work / "features"
    if eventlog.exists():
        shutil.rmtree(eventlog)
    tables = write_eventlog(data, eventlog)
    n_events = len(tables["video_events"]) + len(tables["comment_events"])
    print(f"features benchmark: {n_events} events, {counts}", flush=True)

    # Both builds get the same global time cuts: the 80% and 90% quantiles of all event times.
    valid_ts, test_ts = global_cuts(np.concatenate([tables["video_events"]["ts"].to_numpy(),
                                                    tables["comment_events"]["ts"].to_numpy()]), 0.1, 0.1)
    config = FeaturesConfig(eventlog=str(eventlog), out=str(out), encoder="hash", encoder_dim=64, embed_cache="off",
                            split_valid_ts=valid_ts, split_test_ts=test_ts)
    # The baseline first, without Ray running, so that the two peaks are measured apart.
    with PeakRss() as base_rss:
        started = time.perf_counter()
        local = build_pandas(tables["videos"], tables["comments"], tables["video_events"], tables["comment_events"],
                             max_history=config.max_history, num_negatives=config.num_negatives, seed=config.seed,
                             window_ms=config.negative_window_ms, protocol=config.video_protocol,
                             split=config.split, valid_ts=valid_ts, test_ts=test_ts)
        baseline_s = time.perf_counter() - started
    print(f"features benchmark: pandas baseline {baseline_s:.1f}s", flush=True)
    write_baseline(local, work / "baseline")
    del local, tables

    init_ray()
    with PeakRss() as ray_rss:
        started = time.perf_counter()
        manifest = build_features(config)
        build_s = time.perf_counter() - started
    differ = same_rows(out, work / "baseline")

    videos = pq.read_table(out / "videos.parquet", columns=["text"])["text"].to_pylist()
    comments = pq.read_table(out / "comments.parquet", columns=["text"])["text"].to_pylist()
    rng = np.random.default_rng(0)
    # Distinct texts: embed_texts embeds each distinct text once, so repeats would inflate texts/s.
    pool = sorted(set(videos + comments))
    sample = [pool[i] for i in rng.choice(len(pool), size=min(opts["embed_sample"], len(pool)), replace=False)]
    with PeakRss() as embed_rss:
        texts_per_s = embed_throughput(sample, work)

    sequence_s = build_s - manifest["embed_s"]
    return {
        "events": n_events,
        "users": opts["users"],
        "videos": manifest["num_videos"],
        "comments": manifest["num_comments"],
        "examples": sum(v["count"] for task in manifest["tasks"].values() for v in task.values()),
        "build_s": round(build_s, 2),
        "sequence_build_s": round(sequence_s, 2),
        "hash_embed_s": manifest["embed_s"],
        "peak_rss_gb": max(ray_rss.peak_gb, base_rss.peak_gb, embed_rss.peak_gb),
        "ray_build_peak_rss_gb": ray_rss.peak_gb,
        "baseline_peak_rss_gb": base_rss.peak_gb,
        "embed_texts_per_s": round(texts_per_s, 1),
        "embed_sample_texts": len(sample),
        "baseline_build_s": round(baseline_s, 2),
        "ratio_vs_baseline": round(sequence_s / baseline_s, 3),
        "build_cpu_s": ray_rss.cpu_s,
        "baseline_cpu_s": base_rss.cpu_s,
        "same_rows_as_baseline": not differ,
        "differing_tables": ",".join(differ),
        **embed,
        "notes": (
            f"One run on the generator's {opts['users']}-user log ({n_events} video and comment events), written "
            "as a date-partitioned Parquet event log without Kafka. build_s is the whole Ray Data build (catalogs, "
            "hash-encoder embeddings of every video and comment text, both stages, negatives, writes); "
            "sequence_build_s = build_s - hash_embed_s is what ratio_vs_baseline compares with baseline_build_s, "
            "a plain single-process pandas build (benchmarks/pandas_features.py: per-video and per-user sweeps, "
            "same seeded samplers) on the same in-memory tables, run first, before Ray starts; "
            "same_rows_as_baseline says every example and user row is equal, video negatives included. "
            "build_cpu_s / baseline_cpu_s are the CPU seconds of this process and its descendants (Ray head, "
            "raylet, workers) during each build: on a shared machine they move less than wall time. "
            "embed_texts_per_s is MiniLM through the Ray Data actor pool (1 actor, all cores) on "
            f"{len(sample)} distinct sampled catalog texts, cache off; a full MiniLM build embeds each new text once "
            "(content-hash cache), so its embedding time is the catalog size over this rate the first time and "
            "near zero after. peak_rss_gb sums RSS over this process and every descendant (Ray head, raylet, "
            "workers), sampled every 0.5 s (shared pages counted more than once: an upper bound). "
            "How it scales: the build is three Ray Data passes of a few big tasks, not a Ray groupby (whose "
            "per-group shuffle cost more than the work on 2 cores). Pass 1 reads the event-log files in parallel "
            "and writes the usable rows as partition files by video (video_idx mod P) under OUT/_shuffle; pass 2 "
            "runs one task per partition (hot comments, comment candidates) and writes partition files by user "
            "(a fixed hash of user_id mod P); pass 3 runs one task per user partition (histories, splits, "
            "negatives) and writes the examples. P = max(cluster CPUs, rows / 250k), so with more nodes the "
            "partitions spread over their CPUs and each task's memory stays bounded by its partition; OUT must "
            "be on storage every node sees (as the written examples already are). The driver holds only the "
            "catalogs and per-task counts. The encoder pool grows with embed_concurrency. " + embed["notes"]
        ),
    }
