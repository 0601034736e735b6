"""Which Serve settings a locally started Ray gets."""

import os

from core.runtime import LOCAL_SERVE_ENV, use_local_serve_env


def _clear(monkeypatch):
    for key in LOCAL_SERVE_ENV:
        monkeypatch.delenv(key, raising=False)


def test_a_local_ray_gets_the_serve_settings_but_the_users_own_values_win(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")  # the user turned direct ingress off
    use_local_serve_env()
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "30"


def test_joining_a_cluster_leaves_the_environment_alone(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    use_local_serve_env()
    assert not any(key in os.environ for key in LOCAL_SERVE_ENV)
