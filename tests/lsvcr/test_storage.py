"""lsvcr/storage.py on the local file system and on memory:// (fsspec's in-process file system, reached only
through URIs, like object storage)."""

import fsspec
import pytest

from lsvcr import storage


def test_paths_and_file_uris_are_local(tmp_path):
    assert storage.is_local(tmp_path) and storage.is_local(f"file://{tmp_path}")
    assert not storage.is_local("s3://bucket/x") and not storage.is_local("memory://x")
    assert storage.local_path(f"file://{tmp_path}/a") == tmp_path / "a"
    assert storage.join(tmp_path, "a", "b") == str(tmp_path / "a" / "b")
    assert storage.join("s3://bucket/reg/", "versions", "v0001") == "s3://bucket/reg/versions/v0001"


@pytest.mark.parametrize("remote", [False, True])
def test_text_files_and_listings(tmp_path, remote):
    root = f"memory://storage-{tmp_path.name}" if remote else str(tmp_path / "root")
    assert storage.kind(root) == "missing" and storage.list_dir(root) == []
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "CURRENT"))
    storage.write_text(storage.join(root, "CURRENT"), "v1\n")
    storage.write_text(storage.join(root, "CURRENT"), "v2\n")  # replaced, not appended
    (tmp_path / "w.bin").write_bytes(b"\x00weights")
    storage.upload(tmp_path / "w.bin", storage.join(root, "versions", "v0001", "w.bin"))
    assert storage.read_text(storage.join(root, "CURRENT")) == "v2\n"
    assert storage.list_dir(root) == [("CURRENT", "file"), ("versions", "dir")]
    assert storage.kind(storage.join(root, "versions", "v0001")) == "dir"
    if not remote:  # no temporary file is left beside CURRENT
        assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["CURRENT", "versions"]


def test_local_copy_downloads_complete_folders_once(tmp_path):
    memory = fsspec.filesystem("memory")
    uri = f"memory://copy-{tmp_path.name}/v0001"
    memory.pipe(f"{uri}/model.bin", b"abc")
    with pytest.raises(FileNotFoundError, match="not completely written"):
        storage.local_copy(uri, tmp_path / "cache", "manifest.json")
    assert not (tmp_path / "cache").exists()

    memory.pipe(f"{uri}/manifest.json", b'{"n": 1}')
    copy = storage.local_copy(uri, tmp_path / "cache", "manifest.json")
    assert copy.parent == tmp_path / "cache" and (copy / "model.bin").read_bytes() == b"abc"
    memory.pipe(f"{uri}/model.bin", b"changed behind the same manifest")
    assert storage.local_copy(uri, tmp_path / "cache", "manifest.json") == copy  # not downloaded again
    assert (copy / "model.bin").read_bytes() == b"abc"
    # A folder recreated at the same URI (another manifest) is a new copy.
    memory.pipe(f"{uri}/manifest.json", b'{"n": 2}')
    again = storage.local_copy(uri, tmp_path / "cache", "manifest.json")
    assert again != copy and (again / "model.bin").read_bytes() == b"changed behind the same manifest"
    assert storage.local_copy(str(tmp_path), tmp_path / "cache", "manifest.json") == tmp_path  # local: itself


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="nosuchfs:// is not available"):
        storage.kind("nosuchfs://bucket/x")
