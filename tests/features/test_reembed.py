import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import contract
from features.embeddings import HashEncoder
from features.reembed import reembed


def make_folder(root):
    """A features folder with what reembed reads and keeps: catalogs, one example file, tables, manifest."""
    (root / "examples" / "video" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"video_idx": [0, 1], "video_id": ["v0", "v1"], "text": ["red fox", "blue sky"]}),
                   root / contract.VIDEOS)
    pq.write_table(pa.table({"comment_idx": [0, 1, 2], "comment_id": ["c0", "c1", "c2"],
                             "text": ["so good", "red fox", "meh"]}), root / contract.COMMENTS)
    pq.write_table(pa.table({"target": [1, 0]}), root / "examples" / "video" / "train" / "part-0.parquet")
    np.save(root / contract.VIDEO_EMB, np.ones((2, 4), np.float32))
    np.save(root / contract.COMMENT_EMB, np.ones((3, 4), np.float32))
    (root / contract.MANIFEST).write_text(json.dumps({"encoder": "minilm", "embedding_dim": 4, "cut_ts": 7}))
    return root


@pytest.mark.integration
def test_reembed_replaces_only_the_tables(tmp_path, ray_session):
    source = make_folder(tmp_path / "source")
    out = tmp_path / "out"
    manifest = reembed(source, out, encoder="hash", embed_cache=tmp_path / "cache")
    # The tables are the new encoder's, row i = catalog row i; nothing else changed.
    assert np.allclose(np.load(out / contract.VIDEO_EMB), HashEncoder(64).encode(["red fox", "blue sky"]), atol=1e-6)
    assert np.allclose(np.load(out / contract.COMMENT_EMB), HashEncoder(64).encode(["so good", "red fox", "meh"]),
                       atol=1e-6)
    assert pq.read_table(out / contract.COMMENT_EMB_TABLE)["id"].to_pylist() == ["c0", "c1", "c2"]
    example = "examples/video/train/part-0.parquet"
    assert (out / example).read_bytes() == (source / example).read_bytes()
    assert manifest == json.loads((out / contract.MANIFEST).read_text())
    assert (manifest["encoder"], manifest["embedding_dim"], manifest["cut_ts"]) == ("hash", 64, 7)
    assert manifest["reembedded_from"] == str(source)
    assert np.load(source / contract.VIDEO_EMB).shape == (2, 4)  # the source is untouched
    # A second run replaces the folder whole; the cache already holds every text.
    assert reembed(source, out, encoder="hash", embed_cache=tmp_path / "cache")["embeddings"]["comment_cached"] == 3


def test_reembed_refuses_to_write_over_its_source(tmp_path):
    source = make_folder(tmp_path / "source")
    with pytest.raises(ValueError, match="is the source folder"):
        reembed(source, source, encoder="hash")
