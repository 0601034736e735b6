"""`lsvcr`: one command in front of every job. Each subcommand parses its flags and calls one function.

The subcommands import what they run inside their function bodies: `lsvcr --help` and the light commands
start without importing Ray and PyTorch (the one place project imports are deferred; tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.config import parse_overrides
from core.paths import run_dir
from core.runtime import setup_process


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", help="YAML config file (overrides win over it)")


def cmd_generate(a) -> None:
    from core.config import load_config
    from devtools.generator import GeneratorConfig, generate

    cfg = load_config(GeneratorConfig, a.config, [f"users={a.users}", f"seed={a.seed}", *a.overrides])
    print(json.dumps(generate(a.out, cfg), indent=2))


def cmd_kafka(a) -> None:
    from devtools import broker
    from ingestion.topics import ensure_topics

    if a.action == "start":
        bootstrap = broker.start()
        created = ensure_topics(bootstrap)
        print(f"[kafka] topics ready ({len(created)} created)")
    elif a.action == "stop":
        broker.stop()
    else:
        print(json.dumps(broker.status(), indent=2))


def cmd_replay(a) -> None:
    from devtools.broker import bootstrap_servers
    from ingestion.replay import replay
    from ingestion.topics import ensure_topics

    bootstrap = a.bootstrap or bootstrap_servers()
    ensure_topics(bootstrap, a.topic_prefix)
    replay(a.data, bootstrap, a.topic_prefix)


def cmd_ingest(a) -> None:
    from core.config import load_config
    from devtools.broker import bootstrap_servers
    from ingestion.consumer import IngestConfig, ingest
    from ingestion.topics import ensure_topics

    bootstrap = a.bootstrap or bootstrap_servers()
    if a.overrides[:1] == ["status"]:  # `lsvcr ingest status`: lag, offsets, throughput, dead letters
        from ingestion.status import format_status, ingest_status

        status = ingest_status(a.eventlog, bootstrap, a.group or "lsvcr-ingest", a.topic_prefix)
        print(json.dumps(status, indent=2) if a.json else format_status(status))
        return
    ensure_topics(bootstrap, a.topic_prefix)
    values = {"eventlog": a.eventlog, "bootstrap": bootstrap, "topic_prefix": a.topic_prefix, "until_idle_s": a.until_idle}
    if a.group:
        values["group"] = a.group
    ingest(load_config(IngestConfig, a.config, {**values, **parse_overrides(a.overrides)}))


def cmd_features(a) -> None:
    from core.config import load_config
    from core.runtime import init_ray
    from features.build import build_features
    from features.config import FeaturesConfig

    cfg = load_config(FeaturesConfig, a.config, [f"eventlog={a.eventlog}", f"out={a.out}", *a.overrides])
    init_ray()
    print(json.dumps(build_features(cfg), indent=2))


def cmd_train(a) -> None:
    from core.config import load_config
    from core.runtime import init_ray

    init_ray()
    if a.stage == "align":
        from trainers.align import AlignConfig, align

        out = a.out or str(run_dir() / "checkpoints" / "aligned")
        cfg = load_config(AlignConfig, a.config, [f"features={a.features}", f"out={out}", *a.overrides])
        print(f"[train] aligned checkpoint: {align(cfg)}")
        return
    from trainers.finetune import FinetuneConfig, finetune

    out = a.out or str(run_dir() / "checkpoints" / a.model)
    values = [f"features={a.features}", f"out={out}", f"model={a.model}", *a.overrides]
    if a.init:
        values.append(f"init={a.init}")
    print(f"[train] checkpoint: {finetune(load_config(FinetuneConfig, a.config, values))}")


def cmd_evaluate(a) -> None:
    from trainers.evaluate import evaluate, format_table

    checkpoints = dict(item.split("=", 1) for item in a.checkpoint)
    results = evaluate(a.features, checkpoints, split=a.split)
    print(format_table(results))
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
        print(f"[evaluate] wrote {a.json}")


def cmd_serve(a) -> None:
    from devtools.broker import bootstrap_servers
    from serving.app import serve_forever

    source = {"checkpoint": a.checkpoint, "features": a.features} if a.checkpoint else {"registry": a.registry}
    serve_forever(**source, host=a.host, port=a.port, sequence_store=a.sequence_store,
                  catalog_bootstrap=bootstrap_servers() if a.follow_catalog else None, topic_prefix=a.topic_prefix)


def cmd_registry(a) -> None:
    from trainers.registry import Registry, RegistryError

    registry = Registry(a.registry)
    try:
        if a.action == "publish":
            if not a.checkpoint:
                raise RegistryError("publish needs --checkpoint DIR")
            print(f"[registry] published {registry.publish(a.checkpoint, _publish_features(registry, a.features))} "
                  "(now current)")
        elif a.action == "rollback":
            print(f"[registry] current version is now {registry.rollback(a.to)}")
        else:
            current = registry.current()
            for version in registry.versions():
                m = registry.manifest(version)
                mark = "*" if version == current else " "
                print(f"{mark} {version}  {m['model']:7s} {m['published_at']}  {m['source']}")
    except RegistryError as err:
        raise SystemExit(f"[registry] {err}") from None


def _publish_features(registry, features: str) -> str:
    """The local features folder to publish with. A URI is copied into the cache; only an object-storage
    registry can take one (it uploads the serving files), since a local registry records the folder's path."""
    from core import storage
    from features.folder import FeaturesFolder
    from trainers.registry import RegistryError

    if storage.is_local(features):
        return features
    if registry.local:
        raise RegistryError(f"--features {features} is a URI, but the registry {registry.root} is a local folder, "
                            "which records its features by path: give a features folder on the shared file "
                            "system, or use a registry URI (s3://...)")
    return str(FeaturesFolder(features).root)


def cmd_run(a) -> None:
    from lsvcr.pipeline import PipelineConfig, run_pipeline

    work = a.work or str(run_dir() / "runs" / Path(a.data).resolve().name)
    from lsvcr.suite import MODEL_NAMES

    models = MODEL_NAMES if a.models == "all" else tuple(m for m in a.models.split(",") if m)
    run_pipeline(PipelineConfig(data=a.data, work=work, results=a.out, epochs=a.epochs, models=models,
                                align=tuple(a.align), seeds=a.seeds))


def cmd_demo(a) -> None:
    from core.config import load_config
    from lsvcr.demo import DemoConfig, demo

    flags = {"users": a.users, "seed": a.seed, "epochs": a.epochs, "serve_seconds": a.serve_seconds}
    demo(load_config(DemoConfig, a.config, {**{k: v for k, v in flags.items() if v is not None},
                                             **parse_overrides(a.overrides)}))


def cmd_report(a) -> None:
    from trainers.report import report

    print(f"[report] wrote {report(a.run_dir, a.out)}")


def cmd_continuous(a) -> None:
    from core.config import load_config
    from lsvcr.continuous import ContinuousConfig, run_continuous

    print(json.dumps(run_continuous(load_config(ContinuousConfig, a.config, a.overrides)), indent=2, default=str))


def cmd_jobs(a) -> None:
    from lsvcr import jobs

    if a.action == "submit":
        if not a.target:
            raise SystemExit(f"lsvcr jobs submit STAGE: one of {sorted(jobs.STAGES)}")
        job_id = jobs.submit(a.target, ([a.config] if a.config else []) + a.overrides, address=a.address)
        print(f"[jobs] submitted {a.target} as {job_id} to {jobs.head_address(a.address)}; follow it with "
              f"`lsvcr jobs logs {job_id}` or on the dashboard ({jobs.head_address(a.address)}/#/jobs)")
    elif a.action == "list":
        for job in jobs.list_jobs(a.address):
            print(f"{job['job_id']}\t{job['status']}\t{job['entrypoint']}")
    elif not a.target:
        raise SystemExit(f"lsvcr jobs {a.action} JOB_ID")
    elif a.action == "status":
        print(json.dumps(jobs.info(a.target, a.address), indent=2))
    elif a.action == "logs":
        print(jobs.logs(a.target, a.address), end="")
    elif a.action == "stop":
        print(f"[jobs] stop {a.target}: {'requested' if jobs.stop(a.target, a.address) else 'it was not running'}")
    elif a.action == "wait":
        print(jobs.wait(a.target, a.address, timeout_s=a.timeout))


def cmd_benchmark(a) -> None:
    from benchmarks.harness import run

    run(a.name, a.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsvcr", description="LSVCR-stream: streaming joint video and comment recommendation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write a synthetic dataset in the data contract")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    _add_overrides(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("kafka", help="run the local Kafka broker (KRaft, 127.0.0.1)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser("replay", help="produce a dataset folder to Kafka in time order")
    p.add_argument("--data", required=True)
    p.add_argument("--bootstrap")
    p.add_argument("--topic-prefix", default="")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("ingest", help="consume the topics into the Parquet event log; `ingest status` reports lag")
    p.add_argument("--eventlog", default=str(run_dir() / "eventlog"))
    p.add_argument("--bootstrap")
    p.add_argument("--group")
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--until-idle", type=float, default=None, help="stop after N idle seconds once caught up")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    _add_overrides(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("features", help="build point-in-time examples and item embeddings with Ray Data")
    p.add_argument("action", choices=["build"])
    p.add_argument("--eventlog", default=str(run_dir() / "eventlog"), help="the event log: a folder or a URI")
    p.add_argument("--out", default=str(run_dir() / "features"),
                   help="a folder, or a URI (s3://...) the build is uploaded to with manifest.json last")
    _add_overrides(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train", help="train with Ray Train: stage 1 `align` (SR + LLM), stage 2 `finetune`")
    p.add_argument("stage", choices=["align", "finetune"])
    p.add_argument("--features", default=str(run_dir() / "features"), help="a features folder or URI (s3://...)")
    p.add_argument("--out", help="checkpoint folder (default .run/checkpoints/<aligned|model>)")
    p.add_argument("--model", default="sr", choices=["sr", "sasrec"], help="finetune: which model")
    p.add_argument("--init", help="finetune: start from this checkpoint (an aligned stage 1 model)")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="rank-based metrics for both tasks, with the popularity baseline")
    p.add_argument("--features", default=str(run_dir() / "features"), help="a features folder or URI (s3://...)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve recommendations with Ray Serve, following the model registry")
    p.add_argument("--registry", default=str(run_dir() / "registry"),
                   help="the model registry: a folder or a URI such as s3://bucket/registry")
    p.add_argument("--checkpoint", help="serve this checkpoint instead of the registry's current version")
    p.add_argument("--features", default=str(run_dir() / "features"), help="with --checkpoint")
    p.add_argument("--sequence-store", default=str(run_dir() / "eventlog" / "_state" / "sequences.sqlite"),
                   help="the ingest consumer's online sequence store: fresh user histories per request")
    p.add_argument("--follow-catalog", action="store_true",
                   help="embed videos and comments from the catalog topics as they arrive")
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("registry", help="model versions: list, publish, rollback")
    p.add_argument("action", choices=["list", "publish", "rollback"])
    p.add_argument("--registry", default=str(run_dir() / "registry"),
                   help="the model registry: a folder or a URI such as s3://bucket/registry")
    p.add_argument("--checkpoint", help="publish: the checkpoint folder")
    p.add_argument("--features", default=str(run_dir() / "features"), help="publish: its features folder")
    p.add_argument("--to", help="rollback: this version (default: the one before the current)")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("run", help="replay, ingest, features, train and evaluate one dataset folder")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="metrics JSON")
    p.add_argument("--work", help="folder for the event log, features and checkpoints")
    p.add_argument("--epochs", type=int, default=None, help="stage 2 epochs (default: early stopping decides)")
    p.add_argument("--models", default="popularity,sasrec,sr_no_align,sr_rec_pretrain",
                   help="comma list of popularity, sasrec, sr_no_align, sr_text_only, sr_rec_pretrain (the served "
                        "model), sr_rec_item_pretrain, lsvcr_no_vc_contrast, lsvcr_no_time, lsvcr; or 'all' (the "
                        "lsvcr ones run stage 1 with the LLM: slow on CPU)")
    p.add_argument("--align", action="append", default=[], metavar="key=value",
                   help="stage 1 override, repeatable (e.g. --align max_examples=2000 --align llm_mode=frozen)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every model this many times (seeds 0..N-1): means, standard deviations and paired "
                        "95%% intervals against sr_no_align")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="generate data and run everything end to end, then serve two users")
    p.add_argument("--users", type=int, help="generated users (default 2000)")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--serve-seconds", type=float, help="keep serving this long after the demo")
    _add_overrides(p)  # --config configs/demo.yaml; flags and overrides win over it
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="Markdown metrics table and PNG training curves of a run's models")
    p.add_argument("run_dir", help="a folder holding the suite's metrics.json (e.g. .run/runs/NAME/models)")
    p.add_argument("--out", help="report folder (default: next to metrics.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("continuous", help="keep the model fresh from the event stream: ingest, features, "
                                          "fine-tune, evaluate, publish (see docs/CLUSTER.md)")
    _add_overrides(p)
    p.set_defaults(func=cmd_continuous)

    p = sub.add_parser("jobs", help="submit and follow stages as Ray Jobs on a running head (default "
                                    "http://127.0.0.1:8265)")
    p.add_argument("action", choices=["submit", "status", "logs", "stop", "wait", "list"])
    p.add_argument("target", nargs="?", help="submit: continuous, align, finetune or features; else the job id")
    p.add_argument("--address", help="the head's dashboard address (default RAY_ADDRESS if http, else local)")
    p.add_argument("--timeout", type=float, default=3600.0, help="wait: give up after this many seconds")
    _add_overrides(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("benchmark", help="measure one part and write benchmarks/results/NAME.json")
    p.add_argument("name", help="ingest, features, train, quality, serve or continuous")
    _add_overrides(p)
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_process()
    parser = build_parser()
    # key=value overrides may come after options, which argparse would refuse as positionals.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
