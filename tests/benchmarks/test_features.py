"""The features benchmark's pieces on a tiny generated log: the Ray Data build and the pandas baseline give the
same rows, and the comparison notices a difference."""

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from benchmarks import features as benchmark
from benchmarks.pandas_features import build_pandas
from features.build import build_features
from features.config import FeaturesConfig
from features.partitions import SHUFFLE

pytestmark = pytest.mark.integration


def test_ray_build_has_the_same_rows_as_the_pandas_baseline(tmp_path, ray_session):
    counts = benchmark.dataset(tmp_path / "gen", users=80, seed=5)
    tables = benchmark.write_eventlog(tmp_path / "gen", tmp_path / "eventlog")
    assert len(tables["video_events"]) == counts["video_events"] > 0
    # Two partitions so that the partition files really split videos and users.
    config = FeaturesConfig(eventlog=str(tmp_path / "eventlog"), out=str(tmp_path / "out"), num_negatives=6,
                            encoder="hash", encoder_dim=16, embed_cache="off", shuffle_partitions=2)
    manifest = build_features(config)
    assert not (tmp_path / "out" / SHUFFLE).exists()
    local = build_pandas(*(tables[n] for n in ("videos", "comments", "video_events", "comment_events")),
                         num_negatives=6, protocol=config.video_protocol, split=config.split,
                         valid_ts=manifest["split_valid_ts"], test_ts=manifest["split_test_ts"])
    assert manifest["tasks"]["video"]["train"]["count"] == len(local["video/train"]) > 0
    benchmark.write_baseline(local, tmp_path / "baseline")
    assert benchmark.same_rows(tmp_path / "out", tmp_path / "baseline") == []

    # One changed history element is noticed.
    path = tmp_path / "baseline" / "comment-train.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(2, "ts", pc.add(table["ts"], 1)), path)
    assert benchmark.same_rows(tmp_path / "out", tmp_path / "baseline") == ["comment/train"]


def test_defaults_name_the_benchmark_size():
    from benchmarks.harness import parse_overrides

    # issue 4: 1M events from 100k generated users
    assert parse_overrides("features", benchmark.DEFAULTS, ["users=7"])["users"] == 7
    assert benchmark.DEFAULTS["users"] == 100_000
