"""Model registry: a folder of immutable versions and a CURRENT pointer that serving follows.

    REGISTRY/versions/v0001/  model.safetensors, config.json, train.json (as trained), manifest.json (last)
    REGISTRY/CURRENT          the serving version's name
    REGISTRY/history.jsonl    one line per publish or rollback
    REGISTRY/features/<sha>/  object storage only: the features files serving needs, shared by versions

REGISTRY is a local path (a shared file system on a cluster) or a URI such as s3://bucket/lsvcr/registry
(core/storage.py). Locally, a version is written under a temporary name and renamed into place, and CURRENT
is replaced with os.replace, so readers see either the old state or the new one, never half of either. On
object storage nothing can be renamed: a version counts only once its manifest.json (written last) is there,
CURRENT is one object PUT, and there should be one publisher at a time (the continuous job). A version's
features folder is referenced by path in a local registry; an object-storage registry carries its own copy
of the serving files, so a replica on any machine needs nothing but the registry URI. Readers get local
folders (`path`, `features_path`), downloaded once into the cache when the registry is remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from core import contract, storage
from core.paths import cache_dir
from trainers.checkpoint import CONFIG, TRAIN, WEIGHTS, CheckpointError, load_model

MANIFEST = "manifest.json"  # a version's manifest (model, source, features, metrics)
# What serving and warm starts read from a features folder (serving/state.py, trainers/scoring.py,
# lsvcr/continuous.py); its manifest goes last, as the marker of a complete copy.
SERVING_FEATURES = (contract.VIDEO_EMB, contract.COMMENT_EMB, contract.VIDEOS, contract.COMMENTS, contract.USERS,
                    contract.MANIFEST)


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why and nothing was changed."""


class Registry:
    def __init__(self, root: str | Path):
        self.local = storage.is_local(root)
        self.root = str(storage.local_path(root).absolute()) if self.local else str(root).rstrip("/")
        self.versions_dir = storage.join(self.root, "versions")

    # ---- reading ----------------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        names = [name for name, kind in storage.list_dir(self.versions_dir) if kind == "dir" and name.startswith("v")]
        if self.local:
            return names  # renamed into place whole
        return [n for n in names if storage.kind(storage.join(self.versions_dir, n, MANIFEST)) == "file"]

    def current(self) -> str | None:
        try:
            name = storage.read_text(storage.join(self.root, "CURRENT")).strip()
        except FileNotFoundError:
            return None
        return name or None

    def path(self, version: str) -> Path:
        """A local folder with the version's files (downloaded once when the registry is remote)."""
        uri = storage.join(self.versions_dir, version)
        if storage.kind(storage.join(uri, MANIFEST)) != "file":
            raise RegistryError(f"no version {version!r} in {self.root}; have {self.versions()}")
        return storage.local_copy(uri, _cache("versions"), MANIFEST)

    def manifest(self, version: str) -> dict:
        try:
            return json.loads(storage.read_text(storage.join(self.versions_dir, version, MANIFEST)))
        except FileNotFoundError:
            raise RegistryError(f"no version {version!r} in {self.root}; have {self.versions()}") from None

    def features_path(self, version: str) -> Path:
        """A local features folder the version serves with (downloaded once when the registry is remote)."""
        return storage.local_copy(self.manifest(version)["features"], _cache("features"), contract.MANIFEST)

    def history(self) -> list[dict]:
        try:
            text = storage.read_text(storage.join(self.root, "history.jsonl"))
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # ---- writing ----------------------------------------------------------------------------------------

    def publish(self, ckpt_dir: str | Path, features: str | Path, metrics: dict | None = None,
                make_current: bool = True) -> str:
        """Copy a checkpoint in as the next version (refused if it does not load) and point CURRENT at it."""
        ckpt_dir, features = Path(ckpt_dir), Path(features)
        try:
            kind, _ = load_model(ckpt_dir)
        except CheckpointError as err:
            raise RegistryError(f"refusing to publish {ckpt_dir}: {err}") from None
        if not (features / contract.VIDEO_EMB).exists():
            raise RegistryError(f"refusing to publish {ckpt_dir}: {features} is not a features folder")
        train = json.loads((ckpt_dir / TRAIN).read_text()) if (ckpt_dir / TRAIN).exists() else {}
        manifest = {
            "model": kind,
            "source": str(ckpt_dir.resolve()),
            "features": str(features.resolve()) if self.local else self._upload_features(features),
            "metrics": metrics if metrics is not None else train.get("valid") or {},
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        files = [ckpt_dir / name for name in (WEIGHTS, CONFIG, TRAIN) if (ckpt_dir / name).exists()]
        version = self._write_version(files, manifest)
        if make_current:
            self._set_current(version, "publish")
        return version

    def _write_version(self, files: list[Path], manifest: dict) -> str:
        text = json.dumps(manifest, indent=2) + "\n"
        if not self.local:
            # Unfinished folders count too: never write into one.
            version = _next_version([name for name, _ in storage.list_dir(self.versions_dir)])
            for file in files:
                storage.upload(file, storage.join(self.versions_dir, version, file.name))
            storage.write_text(storage.join(self.versions_dir, version, MANIFEST), text)
            return version
        versions_dir = Path(self.versions_dir)
        versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = versions_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for file in files:
            shutil.copy2(file, tmp / file.name)
        (tmp / MANIFEST).write_text(text)
        # Version numbers come from the folder names, so two publishers cannot take the same one: the
        # rename fails for the second and it tries the next number.
        while True:
            version = _next_version(self.versions())
            try:
                os.rename(tmp, versions_dir / version)
                return version
            except OSError:
                if not (versions_dir / version).exists():
                    raise

    def _upload_features(self, features: Path) -> str:
        """Copy the serving files of a features folder into the registry once (keyed by their content)."""
        missing = [name for name in SERVING_FEATURES if not (features / name).is_file()]
        if missing:
            raise RegistryError(f"refusing to publish: {features} lacks {missing}")
        digest = hashlib.sha256()
        for name in SERVING_FEATURES:
            with open(features / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        uri = storage.join(self.root, "features", digest.hexdigest()[:16])
        if storage.kind(storage.join(uri, "manifest.json")) != "file":
            for name in SERVING_FEATURES:  # manifest.json last: the marker of a complete copy
                storage.upload(features / name, storage.join(uri, name))
        return uri

    def rollback(self, to: str | None = None) -> str:
        """Point CURRENT at `to`, or at the version that was current before this one."""
        current = self.current()
        if to is None:
            previous = [h["version"] for h in self.history() if h["version"] != current]
            if not previous:
                raise RegistryError(f"nothing to roll back to in {self.root}: history has only {current}")
            to = previous[-1]
        try:
            load_model(self.path(to))
        except CheckpointError as err:
            raise RegistryError(f"refusing to roll back to {to}: {err}") from None
        self._set_current(to, "rollback")
        return to

    def _set_current(self, version: str, action: str) -> None:
        storage.write_text(storage.join(self.root, "CURRENT"), version + "\n")
        line = json.dumps({"version": version, "action": action, "at": time.time()}) + "\n"
        history = storage.join(self.root, "history.jsonl")
        if self.local:
            with open(history, "a") as f:
                f.write(line)
        else:  # objects cannot be appended to
            try:
                before = storage.read_text(history)
            except FileNotFoundError:
                before = ""
            storage.write_text(history, before + line)


def _next_version(names: list[str]) -> str:
    """The version name after the highest vNNNN among `names`."""
    numbers = [int(name[1:]) for name in names if name.startswith("v") and name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:04d}"


def _cache(kind: str) -> Path:
    return cache_dir() / "registry" / kind
