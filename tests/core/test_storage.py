"""core/storage.py on the local file system and on memory:// (fsspec's in-process file system, reached only
through URIs, like object storage)."""

import fsspec
import pytest

from core import storage


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


def test_list_files_and_delete(tmp_path):
    memory = fsspec.filesystem("memory")
    root = f"memory://list-{tmp_path.name}/f"
    memory.pipe(f"{root}/a.txt", b"12345")
    memory.pipe(f"{root}/sub/deep/b.bin", b"xy")
    assert storage.list_files(root) == {"a.txt": 5, "sub/deep/b.bin": 2}
    assert storage.list_files(f"memory://list-{tmp_path.name}/nothing") == {}
    storage.delete(storage.join(root, "sub"))
    assert storage.list_files(root) == {"a.txt": 5}
    storage.delete(storage.join(root, "a.txt"))
    storage.delete(storage.join(root, "missing.txt"))  # nothing to do
    assert storage.list_files(root) == {}
    (tmp_path / "loc" / "x").mkdir(parents=True)
    (tmp_path / "loc" / "x" / "c.txt").write_text("abc")
    assert storage.list_files(str(tmp_path / "loc")) == {"x/c.txt": 3}


def _local_folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_upload_dir_sends_the_marker_last_and_mirrors_the_folder(tmp_path, monkeypatch):
    uri = f"memory://up-{tmp_path.name}/features"
    memory = fsspec.filesystem("memory")
    memory.pipe(f"{uri}/manifest.json", b"old")
    memory.pipe(f"{uri}/stale/part-old.parquet", b"gone")
    memory.pipe(f"{uri}/keep/part-1.parquet", b"same")
    local = _local_folder(tmp_path / "local", {"manifest.json": b'{"n": 2}', "a.npy": b"A" * 10,
                                               "keep/part-1.parquet": b"SAME", "keep/part-2.parquet": b"new"})
    marker_seen = []  # at each upload: was a complete marker there?
    real_upload = storage.upload

    def watching_upload(local_file, dest):
        marker_seen.append((dest.rsplit("/", 1)[-1], storage.kind(storage.join(uri, "manifest.json"))))
        real_upload(local_file, dest)

    monkeypatch.setattr(storage, "upload", watching_upload)
    sent = storage.upload_dir(local, uri, "manifest.json", unchanged=lambda name: name.startswith("keep/part-"))
    # keep/part-1 has the same size remotely and is declared unchanged: not sent (its old bytes stay).
    assert sent == ["a.npy", "keep/part-2.parquet", "manifest.json"]
    assert [name for name, _ in marker_seen] == ["a.npy", "part-2.parquet", "manifest.json"]
    assert all(kind == "missing" for _, kind in marker_seen)  # the old marker went first
    assert storage.list_files(uri) == {"manifest.json": 8, "a.npy": 10, "keep/part-1.parquet": 4,
                                       "keep/part-2.parquet": 3}
    assert memory.cat(f"{uri}/keep/part-1.parquet") == b"same" and memory.cat(f"{uri}/manifest.json") == b'{"n": 2}'
    # Without `unchanged`, every file is sent.
    assert storage.upload_dir(local, uri, "manifest.json") == ["a.npy", "keep/part-1.parquet",
                                                               "keep/part-2.parquet", "manifest.json"]
    assert memory.cat(f"{uri}/keep/part-1.parquet") == b"SAME"
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        storage.upload_dir(_local_folder(tmp_path / "bad", {"a": b"1"}), uri, "manifest.json")


def test_local_copy_copies_again_when_the_folder_changes_during_the_copy(tmp_path, monkeypatch):
    memory = fsspec.filesystem("memory")
    uri = f"memory://race-{tmp_path.name}/f"
    memory.pipe(f"{uri}/data.bin", b"old data")
    memory.pipe(f"{uri}/manifest.json", b"m1")
    real_copy = storage.pafs.copy_files
    calls = []

    def copy_then_rewrite(*args, **kwargs):
        real_copy(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # a writer replaces the folder while the first copy runs
            memory.pipe(f"{uri}/data.bin", b"new data")
            memory.pipe(f"{uri}/manifest.json", b"m2")

    monkeypatch.setattr(storage.pafs, "copy_files", copy_then_rewrite)
    copy = storage.local_copy(uri, tmp_path / "cache", "manifest.json")
    assert len(calls) == 2
    assert (copy / "data.bin").read_bytes() == b"new data" and (copy / "manifest.json").read_bytes() == b"m2"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [copy.name]  # the first copy is gone
