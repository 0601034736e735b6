"""trainers/data.py: features folders given as URIs (memory:// is fsspec's in-process file system, reached only
through URIs, like object storage)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from core import storage
from core.contract import SPLITS, TASKS
from trainers.data import count_examples, examples_source, load_text_tables, local_features, worker_features


def _features(root):
    for task in TASKS:
        for split in SPLITS:
            folder = root / "examples" / task / split
            folder.mkdir(parents=True)
            pq.write_table(pa.table({"ts": pa.array([1, 2, 3][: {"train": 3, "valid": 2, "test": 1}[split]])}),
                           folder / "part-0.parquet")
    np.save(root / "video_emb.npy", np.eye(3, 4, dtype=np.float32))
    np.save(root / "comment_emb.npy", np.ones((2, 4), np.float32))
    (root / "manifest.json").write_text(json.dumps({"build": 1}))
    return root


def test_local_features_of_a_uri_is_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    local = _features(tmp_path / "built")
    uri = f"memory://data-{tmp_path.name}/features"
    storage.upload_dir(local, uri, "manifest.json")

    copy = local_features(uri)
    assert copy.parent == (tmp_path / "cache" / "features").resolve()
    assert storage.list_files(str(copy)) == storage.list_files(str(local))
    assert count_examples(copy, "video", "train") == 3 and count_examples(copy, "comment", "test") == 1
    video, comment = load_text_tables(copy)
    assert np.array_equal(video.numpy(), np.eye(3, 4, dtype=np.float32)) and comment.shape == (2, 4)
    assert local_features(uri) == copy  # downloaded once
    assert local_features(str(local)) == local and local_features(f"file://{local}") == local

    # A worker uses the driver's copy when its node has it, else takes its own; a path is itself.
    assert worker_features(str(copy), uri) == str(copy)
    assert worker_features(str(tmp_path / "elsewhere" / "abc"), uri) == str(copy)
    assert worker_features(str(local), str(local)) == str(local)


def test_examples_source_reads_a_uri_through_its_file_system(tmp_path):
    local = _features(tmp_path / "built")
    assert examples_source(str(local), str(local), "video", "valid") == (str(local / "examples" / "video" / "valid"),
                                                                         None)
    uri = f"memory://src-{tmp_path.name}/features"
    storage.upload_dir(local, uri, "manifest.json")
    path, fs = examples_source(uri, str(local), "comment", "train")
    assert isinstance(fs, pafs.FileSystem)
    assert pq.read_table(path, filesystem=fs)["ts"].to_pylist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError):
        local_features(f"memory://src-{tmp_path.name}/nothing")
