"""features/folder.py: features folders given as paths and as URIs (memory:// is fsspec's in-process file
system, reached only through URIs, like object storage)."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from core import contract, storage
from features.folder import FeaturesFolder


def _features(root):
    for task in contract.TASKS:
        for split in contract.SPLITS:
            folder = contract.examples_dir(root, task, split)
            folder.mkdir(parents=True)
            pq.write_table(pa.table({"ts": pa.array([1, 2, 3][: {"train": 3, "valid": 2, "test": 1}[split]])}),
                           folder / "part-0.parquet")
    np.save(root / contract.VIDEO_EMB, np.eye(3, 4, dtype=np.float32))
    np.save(root / contract.COMMENT_EMB, np.ones((2, 4), np.float32))
    (root / contract.MANIFEST).write_text(json.dumps({"build": 1}))
    return root


def test_a_uri_is_opened_through_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    local = _features(tmp_path / "built")
    uri = f"memory://data-{tmp_path.name}/features"
    storage.upload_dir(local, uri, contract.MANIFEST)

    folder = FeaturesFolder(uri)
    assert folder.source == uri and folder.is_remote
    assert folder.root.parent == (tmp_path / "cache" / "features").resolve()
    assert storage.list_files(str(folder.root)) == storage.list_files(str(local))
    assert folder.count_examples("video", "train") == 3 and folder.count_examples("comment", "test") == 1
    video, comment = folder.text_tables()
    assert np.array_equal(video, np.eye(3, 4, dtype=np.float32)) and comment.shape == (2, 4)
    assert (folder.num_videos, folder.num_comments, folder.text_dim) == (3, 2, 4)
    assert folder.manifest == {"build": 1}
    assert FeaturesFolder(uri).root == folder.root  # downloaded once
    assert FeaturesFolder(str(local)).root == local and FeaturesFolder(f"file://{local}").root == local
    assert FeaturesFolder.open(folder) is folder

    # In a worker: the driver's copy when this node has it, else a copy of its own; a path is itself.
    moved = pickle.loads(pickle.dumps(folder))
    assert (moved.source, moved.root) == (folder.source, folder.root) and moved.on_this_node() is moved
    elsewhere = pickle.loads(pickle.dumps(folder))
    elsewhere.root = tmp_path / "another-node" / "copy"
    assert elsewhere.on_this_node().root == folder.root
    path_folder = FeaturesFolder(local)
    assert path_folder.on_this_node() is path_folder


def test_examples_source_reads_a_uri_through_its_file_system(tmp_path):
    local = _features(tmp_path / "built")
    assert FeaturesFolder(local).examples_source("video", "valid") == (
        str(contract.examples_dir(local, "video", "valid")), None)
    uri = f"memory://src-{tmp_path.name}/features"
    storage.upload_dir(local, uri, contract.MANIFEST)
    path, fs = FeaturesFolder(uri, root=local).examples_source("comment", "train")
    assert isinstance(fs, pafs.FileSystem)
    assert pq.read_table(path, filesystem=fs)["ts"].to_pylist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError):
        FeaturesFolder(f"memory://src-{tmp_path.name}/nothing")
    with pytest.raises(ValueError, match="split one of"):
        FeaturesFolder(local).examples_dir("video", "nope")
    (contract.examples_dir(local, "video", "test") / "part-0.parquet").unlink()
    contract.examples_dir(local, "video", "test").rmdir()
    with pytest.raises(FileNotFoundError, match="is missing"):
        FeaturesFolder(local).examples_dir("video", "test")
