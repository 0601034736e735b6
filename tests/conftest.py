import os

import pytest

from core.runtime import setup_process

setup_process()  # what every entry point does first (HF_HUB_OFFLINE and friends)

# Ray Data (2.60) starts a pool of 32 FooterReader actors, one Python process each, for every read_parquet just
# to read Parquet footers; on 2 cores that pool cost 20-50 s per features build or training-data read, more
# than the reads. One actor reads the few small files of a test as well. Set before any Ray starts, so the
# session's local Ray, the test `ray start --head` (tests/lsvcr/test_continuous_jobs.py) and the jobs and
# workers they start inherit it; a value already in the environment wins.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Ray's processes push their metrics to the metrics agent every 10 s by default; the Prometheus test
# (tests/ingestion/test_ray_metrics.py) waits for the push, so a 2 s interval takes 6-8 s off it.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds on 2 cores)."""
    import ray

    from core.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    """A real KRaft broker for the session, on its own ports and run folder so a demo broker can run beside it."""
    os.environ["LSVCR_KAFKA_PORT"] = os.environ.get("LSVCR_TEST_KAFKA_PORT", "19192")
    os.environ["LSVCR_KAFKA_CONTROLLER_PORT"] = os.environ.get("LSVCR_TEST_KAFKA_CONTROLLER_PORT", "19193")
    os.environ["LSVCR_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))
    from devtools import broker

    cfg = broker.BrokerConfig()
    bootstrap = broker.start(cfg)
    os.environ["LSVCR_KAFKA_BOOTSTRAP"] = bootstrap
    yield bootstrap
    broker.stop(cfg)
    os.environ.pop("LSVCR_KAFKA_BOOTSTRAP", None)
