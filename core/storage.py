"""Storage locations given as URIs, for what several machines share (the model registry, features folders).

A plain path or file:// is the local file system. s3://, gs://, hdfs://, abfs:// go through pyarrow.fs (credentials
from the environment, as pyarrow reads them). Any other scheme fsspec knows (memory://, az://, ... with its
package installed) goes through fsspec. Readers that need real files (safetensors, memory-mapped .npy) take a
local copy: `local_copy` downloads a remote folder once into a cache keyed by its URI. Writers that build a
folder locally publish it with `upload_dir`, which sends its complete-marker file last.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

# Schemes pyarrow.fs opens itself; the rest are left to fsspec.
_PYARROW_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}


def is_local(uri: str | Path) -> bool:
    scheme = urlparse(str(uri)).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter is not a scheme


def local_path(uri: str | Path) -> Path:
    """The local path of a local URI (file:///x -> /x)."""
    text = str(uri)
    return Path(urlparse(text).path if text.startswith("file://") else text)


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme: str, netloc: str) -> pafs.FileSystem:
    if scheme in _PYARROW_SCHEMES:
        return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")[0]
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"storage scheme {scheme}:// needs fsspec installed") from None
    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as err:
        raise ValueError(f"storage scheme {scheme}:// is not available: {err}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _inner_path(fs: pafs.FileSystem, parsed) -> str:
    if isinstance(fs, pafs.PyFileSystem):  # fsspec spells its paths its own way (memory:// -> /bucket/...)
        return fs.handler.fs._strip_protocol(parsed.geturl())
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a URI. Instances are cached, so one process shares one per bucket."""
    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).absolute())
    parsed = urlparse(str(uri))
    fs = _filesystem_for(parsed.scheme, parsed.netloc)
    return fs, _inner_path(fs, parsed)


def join(uri: str | Path, *parts: str) -> str:
    if is_local(uri):
        return str(local_path(uri).joinpath(*parts))
    return "/".join([str(uri).rstrip("/"), *parts])


def read_text(uri: str) -> str:
    """The file's text; FileNotFoundError when there is none."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Replace the file's text as one step for readers: a rename on a local file system, one object PUT on
    object storage."""
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def kind(uri: str) -> str:
    """'file', 'dir' or 'missing'."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info, "missing")


def list_dir(uri: str) -> list[tuple[str, str]]:
    """(name, 'file' | 'dir') of the folder's direct entries, sorted by name; [] when it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted((i.base_name, "dir" if i.type == pafs.FileType.Directory else "file") for i in infos)


def list_files(uri: str) -> dict[str, int]:
    """{path relative to folder `uri` ("a/b.parquet"): size in bytes} of every file under it, recursively; {} when
    the folder does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(base)}


def delete(uri: str) -> None:
    """Remove a file, or a folder with everything under it; nothing to do when it is missing."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path).type
    if info == pafs.FileType.File:
        fs.delete_file(path)
    elif info == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload_dir(local: str | Path, uri: str, complete_marker: str,
               unchanged: Callable[[str], bool] | None = None) -> list[str]:
    """Make folder `uri` hold exactly the files of local folder `local`, `complete_marker` uploaded last.

    The remote marker is removed first, so while this runs the folder does not count as complete (local_copy
    refuses it); remote files that `local` lacks are removed. A file whose remote copy has the same size and
    for which `unchanged(relative path)` is true is not sent again. Returns the relative paths sent."""
    root = Path(local)
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    if complete_marker not in files:
        raise FileNotFoundError(f"{root} has no {complete_marker}")
    delete(join(uri, complete_marker))
    remote = list_files(uri)
    for name in sorted(set(remote) - set(files)):
        delete(join(uri, *name.split("/")))
    sent = []
    for name in sorted(files, key=lambda n: n == complete_marker):  # the marker last
        if name != complete_marker and remote.get(name) == files[name] and unchanged is not None and unchanged(name):
            continue
        upload(root / name, join(uri, *name.split("/")))
        sent.append(name)
    return sent


def upload(local_file: str | Path, uri: str) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    pafs.copy_files(str(Path(local_file).absolute()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(uri: str, local: str | Path) -> None:
    """Copy every file under folder `uri` into local folder `local`."""
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def local_copy(uri: str, cache: Path, complete_marker: str) -> Path:
    """A local folder with the files of folder `uri`: the folder itself when local, otherwise a copy
    downloaded once under `cache`, keyed by the URI and the content of the remote `complete_marker` file.
    Without that file the folder is missing or still being written, and nothing is copied. The marker is read
    again after the copy: a folder rewritten meanwhile (upload_dir removes the marker first) is copied again."""
    if is_local(uri):
        return local_path(uri)
    for _ in range(3):
        try:
            marker = read_text(join(uri, complete_marker))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} has no {complete_marker}: missing or not completely written") from None
        target = cache / hashlib.sha256(f"{uri}\n{marker}".encode()).hexdigest()[:16]
        if (target / complete_marker).is_file():
            return target
        tmp = cache / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        download_dir(uri, tmp)
        try:
            after = read_text(join(uri, complete_marker))
        except FileNotFoundError:
            after = None
        copied = tmp / complete_marker
        if after == marker and copied.is_file() and copied.read_text() == marker:
            break
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        raise RuntimeError(f"{uri} changed while it was being copied, three times in a row")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
