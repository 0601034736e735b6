"""Model registry: a folder of immutable versions and a CURRENT pointer that serving follows.

    REGISTRY/versions/v0001/  model.safetensors, config.json, train.json (as trained), manifest.json
    REGISTRY/CURRENT          the serving version's name
    REGISTRY/history.jsonl    one line per publish or rollback

A version is written under a temporary name and renamed into place; CURRENT is replaced with os.replace.
Readers therefore see either the old state or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from trainers.checkpoint import CONFIG, TRAIN, WEIGHTS, CheckpointError, load_model

MANIFEST = "manifest.json"


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why and nothing was changed."""


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # ---- reading ----------------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and p.name.startswith("v"))

    def current(self) -> str | None:
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def path(self, version: str) -> Path:
        path = self.versions_dir / version
        if not path.is_dir():
            raise RegistryError(f"no version {version!r} in {self.root}; have {self.versions()}")
        return path

    def manifest(self, version: str) -> dict:
        return json.loads((self.path(version) / MANIFEST).read_text())

    def history(self) -> list[dict]:
        path = self.root / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    # ---- writing ----------------------------------------------------------------------------------------

    def publish(self, ckpt_dir: str | Path, features: str | Path, metrics: dict | None = None,
                make_current: bool = True) -> str:
        """Copy a checkpoint in as the next version (refused if it does not load) and point CURRENT at it."""
        ckpt_dir = Path(ckpt_dir)
        try:
            kind, _ = load_model(ckpt_dir)
        except CheckpointError as err:
            raise RegistryError(f"refusing to publish {ckpt_dir}: {err}") from None
        if not (Path(features) / "video_emb.npy").exists():
            raise RegistryError(f"refusing to publish {ckpt_dir}: {features} is not a features folder")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for name in (WEIGHTS, CONFIG, TRAIN):
            if (ckpt_dir / name).exists():
                shutil.copy2(ckpt_dir / name, tmp / name)
        train = json.loads((ckpt_dir / TRAIN).read_text()) if (ckpt_dir / TRAIN).exists() else {}
        manifest = {
            "model": kind,
            "source": str(ckpt_dir.resolve()),
            "features": str(Path(features).resolve()),
            "metrics": metrics if metrics is not None else train.get("valid") or {},
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Version numbers come from the folder names, so two publishers cannot take the same one: the
        # rename fails for the second and it tries the next number.
        while True:
            existing = self.versions()
            version = f"v{(int(existing[-1][1:]) if existing else 0) + 1:04d}"
            try:
                os.rename(tmp, self.versions_dir / version)
                break
            except OSError:
                if not (self.versions_dir / version).exists():
                    raise
        if make_current:
            self._set_current(version, "publish")
        return version

    def rollback(self, to: str | None = None) -> str:
        """Point CURRENT at `to`, or at the version that was current before this one."""
        current = self.current()
        if to is None:
            previous = [h["version"] for h in self.history() if h["version"] != current]
            if not previous:
                raise RegistryError(f"nothing to roll back to in {self.root}: history has only {current}")
            to = previous[-1]
        self.path(to)
        try:
            load_model(self.path(to))
        except CheckpointError as err:
            raise RegistryError(f"refusing to roll back to {to}: {err}") from None
        self._set_current(to, "rollback")
        return to

    def _set_current(self, version: str, action: str) -> None:
        tmp = self.root / f".CURRENT.{uuid.uuid4().hex[:8]}"
        tmp.write_text(version + "\n")
        os.replace(tmp, self.root / "CURRENT")
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps({"version": version, "action": action, "at": time.time()}) + "\n")
