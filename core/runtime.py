"""Process set-up and one way to start or join Ray, used by every entry point and by the tests.

Nothing here runs on import: entry points call `setup_process()` first (the CLI, each `python -m` job, the
test session), and `init_ray()` calls it too, so Ray's workers inherit the same environment.
"""

from __future__ import annotations

import os
from pathlib import Path

# Process-wide defaults, set before Ray or transformers are imported: never reach a model hub; keep Ray
# Data's per-dataset INFO lines out of the console (they still go to the session's ray-data.log); keep Ray
# Train from routing workers' print through a logger that echoes every line twice.
PROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def setup_process() -> None:
    """Set PROCESS_ENV (values already in the environment win)."""
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)

# Training workers mostly wait on data and Ray Data needs a slot of its own beside them, so a 2-core
# machine is offered as 4 logical CPUs; RAY_ADDRESS (a cluster) overrides all of this.
DEFAULT_LOCAL_CPUS = 4

# Ray Serve settings for a Ray that this process starts. Serve reads them when its modules are imported, in
# this process and in every Ray worker, so they are set before Ray starts (a cluster sets them in `ray start`).
# The first three are the short request path (BENCHMARKS.md, serve): each ingress replica also answers HTTP
# itself on a port of its own (direct ingress, bound to the app's host, 127.0.0.1 by default), so a request
# skips the proxy and the proxy-to-replica call; the app runs on the replica's main event loop, not a thread.
LOCAL_SERVE_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # A stopping replica is held open this long for a load balancer to take it out of rotation; with none in
    # front (one machine), Ray's 30 s default only delays every redeploy and shutdown.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Serve gives a new proxy 3 readiness checks of 5 s, then kills it and fails serve.start; on 2 busy cores
    # (training beside it, a test suite) its start alone can take longer.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}


def use_local_serve_env() -> None:
    """Set LOCAL_SERVE_ENV (values already in the environment win), unless joining a cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return
    for key, value in LOCAL_SERVE_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS if set, else start a local Ray bound to 127.0.0.1.

    The dashboard (127.0.0.1:8265) is on by default: Ray Train's state checks and the Jobs API need it.
    """
    import ray

    if ray.is_initialized():
        return
    setup_process()
    runtime_env = {"env_vars": {k: os.environ[k] for k in PROCESS_ENV}}
    if os.environ.get("RAY_ADDRESS"):
        # A submitted job's driver already runs in the job's runtime_env, and Ray refuses to merge another.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=None if in_job else runtime_env, log_to_driver=True)
        return
    use_local_serve_env()
    cpus = num_cpus or int(os.environ.get("LSVCR_RAY_CPUS", DEFAULT_LOCAL_CPUS))
    ray.init(
        num_cpus=cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
        logging_level="WARNING",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
