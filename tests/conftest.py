import os

import pytest

from core.runtime import setup_process

setup_process()  # what every entry point does first (HF_HUB_OFFLINE and friends)


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
