"""Where run-time state lives: a git-ignored run folder for the broker and job outputs, a cache for models."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """This process's environment with the project first on PYTHONPATH: what a `python -m <module>` child
    process needs to import the project from any working directory."""
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_dir() -> Path:
    """The run folder (LSVCR_RUN_DIR, default ./.run): broker data, event log, features, checkpoints."""
    return Path(os.environ.get("LSVCR_RUN_DIR", ".run")).resolve()


def cache_dir() -> Path:
    """Heavy reusable state keyed by content (converted models), shared by every checkout."""
    return Path(os.environ.get("LSVCR_CACHE_DIR", Path.home() / ".cache" / "lsvcr")).resolve()
