"""build_features end to end through Ray on a small hand-written log, checked by hand and against build_local."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.json  # noqa: F401  (pa.json)
import pyarrow.parquet as pq
import pytest

from core import contract
from core.config import ConfigError, load_config
from core.contract import SPLITS, TASKS
from features.build import build_features
from features.config import FeaturesConfig
from features.embeddings import HashEncoder
from features.incremental import STATE_JSON
from features.partitions import SHUFFLE, USERS_PARTS
from features.sequences import build_local
from ingestion.schema import ARROW_SCHEMA

# Videos: v1=0 (ts 10), v2=1 (20), v3=2 (30), v4=3 (35, no comments). Comments: c1=0, c2=1 under v1; c3=2 under
# v2; cx is under an unknown video. Hot comments: v1 @13 -> c1 (alone), v1 @17 -> c2 (liked @16), v2 @36 -> c3.
LOG = dict(
    videos=[("v1", "cats", ["pets"], 10), ("v2", "dogs", [], 20), ("v3", "news", ["daily"], 30),
            ("v4", "quiet", [], 35)],
    comments=[("c1", "v1", "so cute", 12), ("c2", "v1", "love it", 15), ("c3", "v2", "good dog", 25),
              ("cx", "vzz", "lost", 14)],
    video_events=[
        ("ve1", "u1", "v1", "finish", 13), ("ve2", "u1", "v2", "view", 14), ("ve3", "u1", "v1", "like", 17),
        ("ve4", "u1", "v2", "share", 36), ("ve5", "u1", "v4", "like", 36), ("ve6", "u1", "v3", "finish", 41),
        ("ve7", "u1", "vzz", "like", 42), ("ve8", "u2", "v4", "like", 50),
    ],
    comment_events=[
        ("ce1", "u9", "c2", "v1", "like", 16), ("ce2", "u1", "c1", "v1", "like", 30),
        ("ce3", "u1", "c2", "v1", "reply", 36), ("ce4", "u3", "c3", "v2", "like", 27),
        ("ce5", "u3", "c1", "v1", "reply", 31), ("ce6", "u3", "cq", "v1", "like", 33),
    ],
)
HIST = ["hist_video", "hist_video_hot", "hist_video_ts", "hist_cmt_video", "hist_cmt_comments", "hist_cmt_ts"]


def read(path):
    return pq.read_table(path)


def rows_by_event(folder):
    return {r["event_id"]: r for r in read(folder).to_pylist()}


def test_build_features_end_to_end(tmp_path, ray_session, tables, eventlog_writer):
    log = eventlog_writer(tmp_path / "eventlog", tables(**LOG))
    out = tmp_path / "features"
    config = FeaturesConfig(eventlog=str(log), out=str(out), num_negatives=2, encoder="hash", encoder_dim=32,
                            split="leave_last_out", local_max_events=0, embed_local_texts=0)  # through Ray Data
    manifest = build_features(config)
    assert manifest["stages_in_process"] is False

    # Catalog and embeddings.
    videos, comments = read(out / contract.VIDEOS), read(out / contract.COMMENTS)
    assert videos["video_id"].to_pylist() == ["v1", "v2", "v3", "v4"]
    assert comments["comment_id"].to_pylist() == ["c1", "c2", "c3"]
    video_emb = np.load(out / contract.VIDEO_EMB, mmap_mode="r")
    comment_emb = np.load(out / contract.COMMENT_EMB, mmap_mode="r")
    assert video_emb.shape == (4, 32) and comment_emb.shape == (3, 32) and video_emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(video_emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(video_emb, HashEncoder(32).encode(["cats pets", "dogs", "news daily", "quiet"]), atol=1e-6)
    assert np.allclose(comment_emb[2], HashEncoder(32).encode(["good dog"])[0], atol=1e-6)

    # Video task. ve1 @13 and ve8 (u2's only event) have empty histories and are dropped. u1's usable examples:
    # video ve3 @17, ve4 @36, ve5 @36, ve6 @41; comment ce2 @30, ce3 @36. One cut for both tasks: test from the
    # earlier last example (ce3 @36), valid from the earlier second-to-last (ve5 @36): no valid, and ve4, ve5
    # (at the cut) and ve6 are test. u3's one usable example (ce5) trains.
    train, valid, test = (rows_by_event(contract.examples_dir(out, "video", s)) for s in SPLITS)
    assert sorted(train) == ["ve3"] and valid == {} and sorted(test) == ["ve4", "ve5", "ve6"]
    assert [train["ve3"][c] for c in HIST] == [[0], [0], [13], [], [], []]
    assert [test["ve4"][c] for c in HIST] == [[0, 0], [0, 1], [13, 17], [0], [0, -1, -1], [30]]
    assert [test["ve5"][c] for c in HIST] == [c for c in (test["ve4"][h] for h in HIST)]
    assert [test["ve6"][c] for c in HIST] == [[0, 0, 1, 3], [0, 1, 2, -1], [13, 17, 36, 36], [0], [0, 1, -1], [36]]
    assert (train["ve3"]["target"], test["ve5"]["target"], test["ve6"]["target"]) == (0, 3, 2)
    assert train["ve3"]["negatives"] == []  # only the target was published before 17
    # Before 36 and 41: videos 0..3 (v4 at 35); each event's pool is its 3 newest, 1..3, minus the target.
    assert sorted(test["ve4"]["negatives"]) == [2, 3]
    assert sorted(test["ve5"]["negatives"]) == [1, 2]
    assert sorted(test["ve6"]["negatives"]) == [1, 3]

    # Comment task. ce1 (u9) and ce4 (u3's first) have empty histories; ce6's comment is unknown.
    train, valid, test = (rows_by_event(contract.examples_dir(out, "comment", s)) for s in SPLITS)
    assert sorted(train) == ["ce2", "ce5"] and valid == {} and sorted(test) == ["ce3"]
    ce2, ce3, ce5 = train["ce2"], test["ce3"], train["ce5"]
    assert [ce2[c] for c in HIST] == [[0, 0], [0, 1], [13, 17], [], [], []]
    # u1 liked c1 @30 (ce2), then replied to c2 @36 (ce3) under v1: c1 is not a negative of ce3 any more; c2
    # is one of ce2 (the reply comes later: readers leave later positives out, trainers/data.py).
    assert (ce2["query_video"], ce2["target"], ce2["negatives"], ce2["negative_likes"], ce2["target_likes"]) == \
        (0, 0, [1], [1], 0)
    assert [ce3[c] for c in HIST] == [[0, 0], [0, 1], [13, 17], [0], [0, -1, -1], [30]]
    assert (ce3["negatives"], ce3["negative_likes"], ce3["target_likes"]) == ([], [], 1)
    assert [ce5[c] for c in HIST] == [[], [], [], [1], [2, -1, -1], [27]]
    assert (ce5["query_video"], ce5["target"], ce5["negatives"], ce5["negative_likes"], ce5["target_likes"]) == \
        (0, 0, [1], [1], 1)

    # Empty splits still have a file with the schema.
    assert read(contract.examples_dir(out, "comment", "valid")).schema.equals(contract.COMMENT_EXAMPLE_SCHEMA)
    assert read(contract.examples_dir(out, "video", "train")).schema.equals(contract.VIDEO_EXAMPLE_SCHEMA)

    # Users as of the end of the log.
    users = {r["user_id"]: r for r in read(out / contract.USERS).to_pylist()}
    assert sorted(users) == ["u1", "u2", "u3", "u9"]
    assert [users["u1"][c] for c in HIST] == [[0, 0, 1, 3, 2], [0, 1, 2, -1, -1], [13, 17, 36, 36, 41], [0],
                                              [0, 1, -1], [36]]
    assert [users["u2"][c] for c in HIST] == [[3], [-1], [50], [], [], []]
    assert [users["u9"][c] for c in HIST] == [[], [], [], [0], [1, -1, -1], [16]]
    assert [users["u3"][c] for c in HIST] == [[], [], [], [1, 0], [2, -1, -1, 0, -1, -1], [27, 31]]

    # Manifest.
    assert json.loads((out / contract.MANIFEST).read_text()) == json.loads(json.dumps(manifest))
    assert manifest["tasks"]["video"] == {"train": {"count": 1, "ts_min": 17, "ts_max": 17},
                                          "valid": {"count": 0, "ts_min": None, "ts_max": None},
                                          "test": {"count": 3, "ts_min": 36, "ts_max": 41}}
    assert manifest["tasks"]["comment"]["train"] == {"count": 2, "ts_min": 30, "ts_max": 31}
    assert manifest["tasks"]["comment"]["valid"]["count"] == 0
    assert manifest["dropped"] == {"comments_unknown_video": 1, "video_events_unknown_video": 1,
                                   "comment_events_unknown_comment": 1, "video_examples_empty_history": 2,
                                   "comment_examples_empty_history": 2, "comment_examples_target_not_yet_published": 0}
    assert manifest["events"]["video_events_not_positive"] == 1
    assert (manifest["num_videos"], manifest["num_comments"], manifest["num_users"]) == (4, 3, 4)
    assert (manifest["embedding_dim"], manifest["encoder"], manifest["max_history"], manifest["num_negatives"]) == \
        (32, "hash", 50, 2)
    # Each used positive video event's own window for 2 negatives (3 videos, or all there are): ve1 @13 (v1 @10
    # -> 3), ve3 @17 (-> 7), ve4 and ve5 @36 (3rd newest before: v2 @20 -> 16), ve6 @41 (-> 21), ve8 @50 (-> 30).
    assert (manifest["video_protocol"], manifest["alive_window_ms"]) == ("alive_window", 0)
    assert manifest["alive_windows"] == {"events": 6, "min_ms": 3, "median_ms": 16.0, "p90_ms": 25.5, "max_ms": 30}
    test_rows = rows_by_event(contract.examples_dir(out, "video", "test"))
    assert test_rows["ve6"]["negatives"] == test_rows["ve6"]["negatives_alive_window"]
    # popularity_at_t before 41: v1 twice (ve1, ve3), v2 and v4 once (ve4, ve5); v3 is the target.
    assert sorted(test_rows["ve6"]["negatives_popularity_at_t"]) in ([0, 1], [0, 3], [1, 3])

    # The Ray build equals the one-process reference, negatives included.
    local = build_local(*(tables(**LOG)[t] for t in ("videos", "comments", "video_events", "comment_events")),
                            num_negatives=2, split="leave_last_out")
    for task in TASKS:
        for split in SPLITS:
            got = read(contract.examples_dir(out, task, split))
            assert got.sort_by("event_id").equals(local[f"{task}/{split}"].sort_by("event_id")), (task, split)
    assert read(out / contract.USERS).sort_by("user_id").equals(local["users"].sort_by("user_id"))

    # A rerun into the same folder replaces the outputs rather than adding to them.
    build_features(config)
    assert read(contract.examples_dir(out, "video", "test")).num_rows == 3


def test_a_small_build_in_this_process_writes_what_the_ray_build_writes(tmp_path, ray_session, tables,
                                                                         eventlog_writer):
    log = eventlog_writer(tmp_path / "eventlog", tables(**LOG))
    manifests = {}
    for name, limit in (("ray", 0), ("here", 1_000)):
        manifests[name] = build_features(FeaturesConfig(
            eventlog=str(log), out=str(tmp_path / name), num_negatives=2, encoder="hash", encoder_dim=32,
            split="leave_last_out", local_max_events=limit, embed_local_texts=limit, embed_cache="off"))
    assert (manifests["ray"]["stages_in_process"], manifests["here"]["stages_in_process"]) == (False, True)
    assert manifests["here"]["tasks"] == manifests["ray"]["tasks"]
    assert manifests["here"]["events"] == manifests["ray"]["events"]
    here, ray = tmp_path / "here", tmp_path / "ray"
    for task in TASKS:
        for split in SPLITS:
            assert rows_by_event(contract.examples_dir(here, task, split)) == \
                rows_by_event(contract.examples_dir(ray, task, split))
    key = lambda r: r["user_id"]  # noqa: E731
    assert sorted(read(here / contract.USERS).to_pylist(), key=key) == \
        sorted(read(ray / contract.USERS).to_pylist(), key=key)
    for name in (contract.VIDEO_EMB, contract.COMMENT_EMB):
        assert np.array_equal(np.load(here / name), np.load(ray / name))
    assert sum(len(rows_by_event(contract.examples_dir(here, task, "test"))) for task in TASKS) > 0


def test_build_features_without_comment_tables(tmp_path, ray_session, tables, eventlog_writer):
    t = tables(videos=LOG["videos"], video_events=LOG["video_events"])  # no comments, no comment events
    log = eventlog_writer(tmp_path / "eventlog", t)
    manifest = build_features(FeaturesConfig(eventlog=str(log), out=str(tmp_path / "f"), encoder="hash",
                                             split="leave_last_out"))
    assert manifest["num_comments"] == 0
    assert np.load(tmp_path / "f" / contract.COMMENT_EMB).shape == (0, 64)
    test = rows_by_event(contract.examples_dir(tmp_path / "f", "video", "test"))
    assert sorted(test) == ["ve6"]
    assert test["ve6"]["hist_video_hot"] == [-1, -1, -1, -1]  # no video has a comment
    assert manifest["tasks"]["comment"]["train"]["count"] == 0


def test_build_features_rejects_a_missing_eventlog(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_features(FeaturesConfig(eventlog=str(tmp_path / "nope"), out=str(tmp_path / "f"), encoder="hash"))


def test_config_validation_and_overrides():
    cfg = load_config(FeaturesConfig, None, ["eventlog=a", "out=b", "max_history=7",
                                             "positive_video_actions=like,finish"])
    assert cfg.max_history == 7 and cfg.positive_video_actions == ("like", "finish")
    assert FeaturesConfig(eventlog="a", out="b").encoder == "minilm"
    with pytest.raises(ConfigError, match="positive_video_actions"):
        FeaturesConfig(eventlog="a", out="b", positive_video_actions=("view", "poke"))
    with pytest.raises(ConfigError, match="encoder"):
        FeaturesConfig(eventlog="a", out="b", encoder="nope")
    with pytest.raises(ConfigError, match="max_history"):
        FeaturesConfig(eventlog="a", out="b", max_history=0)
    with pytest.raises(ConfigError, match="differ"):
        FeaturesConfig(eventlog="a", out="a")


def test_build_local_matches_hand_values_without_ray(tables):
    local = build_local(*(tables(**LOG)[t] for t in ("videos", "comments", "video_events", "comment_events")),
                            num_negatives=2)
    # leave_last_out (build_local's default): one cut for u1 at ce3 @36 (test_build_features_end_to_end).
    assert local["video/train"]["event_id"].to_pylist() == ["ve3"]
    assert sorted(local["video/test"]["event_id"].to_pylist()) == ["ve4", "ve5", "ve6"]
    assert local["comment/test"]["event_id"].to_pylist() == ["ce3"]
    assert local["video/train"].schema.equals(contract.VIDEO_EXAMPLE_SCHEMA)
    assert local["comment/test"].schema.equals(contract.COMMENT_EXAMPLE_SCHEMA)
    assert local["users"].schema.equals(contract.USERS_SCHEMA)
    empty = build_local(*(tables()[t] for t in ("videos", "comments", "video_events", "comment_events")))
    assert empty["video/test"].num_rows == 0 and empty["users"].num_rows == 0


def test_future_events_do_not_change_past_examples(tables):
    """Appending events, comments and likes at ts >= 100 leaves every example before 100 as it was."""
    future = dict(
        videos=LOG["videos"] + [("v5", "later", [], 100)],
        comments=LOG["comments"] + [("c9", "v1", "late comment", 100), ("c8", "v2", "later still", 120)],
        video_events=LOG["video_events"] + [("f1", "u1", "v5", "like", 101), ("f2", "u2", "v1", "finish", 100)],
        comment_events=LOG["comment_events"] + [
            ("f3", "u1", "c9", "v1", "like", 110), ("f4", "u9", "c3", "v2", "like", 100),
            ("f5", "u3", "c8", "v2", "reply", 130), *[(f"f{i}", "o", "c1", "v1", "like", 100 + i) for i in range(6, 12)],
        ],
    )
    names = ("videos", "comments", "video_events", "comment_events")
    # A fixed alive window: an incremental build cannot use per-event ones.
    past = build_local(*(tables(**LOG)[t] for t in names), num_negatives=2, window_ms=30)["rows"]
    full = build_local(*(tables(**future)[t] for t in names), num_negatives=2, window_ms=30)["rows"]
    keep = [c for c in past.column_names if c != "split"]  # only the split may move: later examples exist now

    def examples_before_100(rows):
        rows = rows.filter(pa.compute.and_(pa.compute.less(rows["ts"], 100),
                                           pa.compute.not_equal(rows["row_kind"], "user")))
        return rows.select(keep).sort_by("event_id")

    assert examples_before_100(past).num_rows == 11  # 6 video + 5 comment events with known items
    assert examples_before_100(full).equals(examples_before_100(past))


# ------------------------------------------------------------------------------------------------ hive layout, incremental


def write_hive(root, tables, day_of):
    """EVENTLOG/<table>/date=<day>/part-0.parquet, one partition per day_of(ts); plus hidden junk to skip."""
    for name, table in tables.items():
        days = sorted({day_of(ts) for ts in table["ts"].to_pylist()})
        for day in days:
            part = table.filter(pa.compute.equal(pa.array([day_of(ts) for ts in table["ts"].to_pylist()]), day))
            folder = root / name / f"date={day}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, folder / f"part-{len(list(folder.glob('*')))}.parquet")
        (root / name / ".part-9.parquet.tmp").write_text("half written")
        (root / name / "_tmp").mkdir(exist_ok=True)
        (root / name / "_tmp" / "part-0.parquet").write_text("not a parquet file")
    return root


def test_eventlog_files_reads_flat_and_hive_layouts(tmp_path, tables):
    from features.build import eventlog_files

    t = tables(**LOG)
    write_hive(tmp_path, {"video_events": t["video_events"]}, lambda ts: f"2024-01-0{1 + ts // 20}")
    pq.write_table(t["video_events"].slice(0, 1), tmp_path / "video_events" / "part-flat.parquet")
    files = [f.split("video_events/")[1] for f in eventlog_files(tmp_path, "video_events")]
    assert files == ["date=2024-01-01/part-0.parquet", "date=2024-01-02/part-0.parquet",
                     "date=2024-01-03/part-0.parquet", "part-flat.parquet"]
    assert eventlog_files(tmp_path, "comments") == []


def split_log(log, upto):
    """The rows of a LOG-like dict with ts <= upto (first) and > upto (second)."""
    first = {k: [r for r in rows if r[-1] <= upto] for k, rows in log.items()}
    second = {k: [r for r in rows if r[-1] > upto] for k, rows in log.items()}
    return first, second


def read_all(out):
    return {f"{task}/{split}": read(contract.examples_dir(out, task, split)).sort_by("event_id")
            for task in TASKS for split in SPLITS} | \
        {"users": read(out / contract.USERS).sort_by("user_id")}


def test_incremental_build_equals_a_full_rebuild(tmp_path, ray_session, tables):
    from devtools.generator import GeneratorConfig, generate

    data = tmp_path / "gen"
    generate(data, GeneratorConfig(users=30, days=4, min_videos=40, comments_per_video=3, seed=5))
    full_tables = {name: pa.json.read_json(data / f"{name}.jsonl", parse_options=pa.json.ParseOptions(
        explicit_schema=ARROW_SCHEMA[name])).select(ARROW_SCHEMA[name].names)
        for name in ARROW_SCHEMA}
    ts = np.sort(full_tables["video_events"]["ts"].to_numpy())
    day_ms = 86_400_000
    split_at = int(ts[len(ts) * 2 // 3])  # the first build sees two thirds of the video events
    valid_ts, test_ts = int(ts[len(ts) // 2]), int(ts[len(ts) * 5 // 6])
    settings = dict(encoder="hash", encoder_dim=16, num_negatives=5, embed_cache=str(tmp_path / "cache"),
                    negative_window_ms=2 * 86_400_000,
                    split="global_time", split_valid_ts=valid_ts, split_test_ts=test_ts, lateness_ms=3_600_000)

    def day(ts):
        return f"d{ts // day_ms}"

    log = tmp_path / "eventlog"
    first = {n: t.filter(pa.compute.less_equal(t["ts"], split_at)) for n, t in full_tables.items()}
    write_hive(log, first, day)
    # pinned to the driver's node, as the continuous job builds: the same rows as the unpinned full build
    inc = FeaturesConfig(eventlog=str(log), out=str(tmp_path / "inc"), incremental=True, on_driver_node=True, **settings)
    m1 = build_features(inc)
    assert m1["mode"] == "full" and m1["cut_ts"] == split_at - 3_600_000
    n_first = sum(v["count"] for v in m1["tasks"]["video"].values())

    # New partitions: everything after split_at, in files of their own (some share a day with old files).
    second = {n: t.filter(pa.compute.greater(t["ts"], split_at)) for n, t in full_tables.items()}
    for name, table in second.items():
        for d in sorted({day(x) for x in table["ts"].to_pylist()}):
            part = table.filter(pa.compute.equal(pa.array([day(x) for x in table["ts"].to_pylist()]), d))
            folder = log / name / f"date={d}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, folder / "part-new.parquet")
    m2 = build_features(inc)
    assert m2["mode"] == "incremental" and m2["previous_cut_ts"] == m1["cut_ts"]
    assert sum(v["count"] for v in m2["tasks"]["video"].values()) > n_first

    full = FeaturesConfig(eventlog=str(log), out=str(tmp_path / "full"), **settings)
    m3 = build_features(full)
    assert m3["mode"] == "full" and m3["cut_ts"] == m2["cut_ts"]
    got, expected = read_all(tmp_path / "inc"), read_all(tmp_path / "full")
    for key in expected:
        assert got[key].equals(expected[key]), key
    assert m2["tasks"] == m3["tasks"] and m2["dropped"] == m3["dropped"]
    assert m3["embeddings"]["video_embedded"] == 0  # the cache already had every text
    assert np.array_equal(np.load(tmp_path / "inc" / contract.COMMENT_EMB),
                          np.load(tmp_path / "full" / contract.COMMENT_EMB))

    # An event later than the lateness bound (at or before the cut) forces a full rebuild, with the same rows.
    late = full_tables["video_events"].slice(0, 1).to_pylist()[0] | {"event_id": "late-1", "ts": m2["cut_ts"] - 5}
    folder = log / "video_events" / "date=late"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([late], schema=ARROW_SCHEMA["video_events"]), folder / "p.parquet")
    m4 = build_features(inc)
    assert m4["mode"] == "full"
    m5 = build_features(full)
    got, expected = read_all(tmp_path / "inc"), read_all(tmp_path / "full")
    for key in expected:
        assert got[key].equals(expected[key]), key
    assert m4["tasks"] == m5["tasks"]


def test_incremental_needs_a_fixed_global_cut():
    with pytest.raises(ConfigError, match="incremental"):
        FeaturesConfig(eventlog="a", out="b", incremental=True)
    with pytest.raises(ConfigError, match="incremental"):
        FeaturesConfig(eventlog="a", out="b", incremental=True, split="global_time")
    with pytest.raises(ConfigError, match="split"):
        FeaturesConfig(eventlog="a", out="b", split="by_coin")
    with pytest.raises(ConfigError, match="frac"):
        FeaturesConfig(eventlog="a", out="b", split_valid_frac=0.6, split_test_frac=0.5)
    with pytest.raises(ConfigError, match="negative_window_ms"):
        FeaturesConfig(eventlog="a", out="b", incremental=True, split="global_time", split_valid_ts=1,
                       split_test_ts=2)
    with pytest.raises(ConfigError, match="video_protocol"):
        FeaturesConfig(eventlog="a", out="b", video_protocol="newest")


def test_global_time_split_by_fractions(tmp_path, ray_session, tables, eventlog_writer):
    log = eventlog_writer(tmp_path / "eventlog", tables(**LOG))
    manifest = build_features(FeaturesConfig(eventlog=str(log), out=str(tmp_path / "f"), encoder="hash",
                                             num_negatives=2, split="global_time", split_valid_frac=0.25,
                                             split_test_frac=0.25, embed_cache="off"))
    # Used positive events by ts: video 13 17 36 36 41 50 (ve7's video is unknown), comment 16 27 30 31 36:
    # sorted 13 16 17 27 30 31 36 36 36 41 50 (11); valid from index floor(11 * 0.5) = 5 -> 31,
    # test from index floor(11 * 0.75) = 8 -> 36.
    assert (manifest["split_valid_ts"], manifest["split_test_ts"]) == (31, 36)
    video = {s: sorted(rows_by_event(contract.examples_dir(tmp_path / "f", "video", s))) for s in SPLITS}
    assert video == {"train": ["ve3"], "valid": [], "test": ["ve4", "ve5", "ve6"]}
    comment = {s: sorted(rows_by_event(contract.examples_dir(tmp_path / "f", "comment", s))) for s in SPLITS}
    assert comment == {"train": ["ce2"], "valid": ["ce5"], "test": ["ce3"]}


# ---- storage URIs: local:// is fsspec's local file system reached through a URI, so it takes the same path as
# s3:// (a pyarrow file system handed to Ray's read tasks, staging and upload) while every Ray worker process
# can read it; memory:// (one process only) is used for the driver-side steps.

def test_build_features_from_and_to_uris_equals_a_local_build(tmp_path, ray_session, tables, eventlog_writer,
                                                               monkeypatch):
    from core import storage

    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    log = eventlog_writer(tmp_path / "eventlog", tables(**LOG))
    settings = dict(num_negatives=2, encoder="hash", encoder_dim=32, embed_cache="off")
    expected = build_features(FeaturesConfig(eventlog=str(log), out=str(tmp_path / "plain"), **settings))
    uri = f"local://{tmp_path}/bucket/features"
    manifest = build_features(FeaturesConfig(eventlog=f"local://{log}", out=uri, **settings))

    remote = tmp_path / "bucket" / "features"
    assert manifest["config"]["out"] == uri and manifest["eventlog"] == f"local://{log}"
    assert json.loads((remote / contract.MANIFEST).read_text()) == json.loads(json.dumps(manifest))
    assert manifest["tasks"] == expected["tasks"] and manifest["dropped"] == expected["dropped"]
    got, want = read_all(remote), read_all(tmp_path / "plain")
    for key in want:
        assert got[key].equals(want[key]), key
    for name in (contract.VIDEO_EMB, contract.COMMENT_EMB):
        assert np.array_equal(np.load(remote / name), np.load(tmp_path / "plain" / name))
    assert not (remote / SHUFFLE).exists() and not (remote / USERS_PARTS).exists()
    # The remote folder is exactly the staging folder.
    staging = next((tmp_path / "cache" / "features-staging").iterdir())
    assert storage.list_files(uri) == storage.list_files(str(staging))


def test_incremental_build_to_a_uri_equals_a_full_rebuild(tmp_path, ray_session, tables, eventlog_writer,
                                                          monkeypatch):
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "cache"))
    settings = dict(num_negatives=2, encoder="hash", encoder_dim=16, embed_cache="off", negative_window_ms=100,
                    split="global_time", split_valid_ts=36, split_test_ts=41)
    first, second = split_log(LOG, 33)
    log = tmp_path / "eventlog"
    eventlog_writer(log, tables(**first))
    uri = f"local://{tmp_path}/bucket/features"
    inc = FeaturesConfig(eventlog=str(log), out=uri, incremental=True, **settings)
    m1 = build_features(inc)
    assert m1["mode"] == "full" and m1["cut_ts"] == 33
    state = json.loads((tmp_path / "bucket" / "features" / STATE_JSON).read_text())
    assert state["cut_ts"] == 33
    for name, table in tables(**second).items():
        if len(table):
            (log / name).mkdir(exist_ok=True)
            pq.write_table(table, log / name / "part-late.parquet")
    # Another node: its staging folder is empty, so the state comes from the URI.
    monkeypatch.setenv("LSVCR_CACHE_DIR", str(tmp_path / "other-node-cache"))
    m2 = build_features(inc)
    assert m2["mode"] == "incremental" and m2["previous_cut_ts"] == 33 and m2["cut_ts"] == 50
    full = build_features(FeaturesConfig(eventlog=str(log), out=str(tmp_path / "full"), **settings))
    got, want = read_all(tmp_path / "bucket" / "features"), read_all(tmp_path / "full")
    for key in want:
        assert got[key].equals(want[key]), key
    assert m2["tasks"] == full["tasks"]
    state = json.loads((tmp_path / "bucket" / "features" / STATE_JSON).read_text())
    assert state["cut_ts"] == 50


def test_prepare_staging_reuses_only_the_same_build(tmp_path):
    import fsspec

    from features.build import prepare_staging

    memory = fsspec.filesystem("memory")
    uri = f"memory://staging-{tmp_path.name}/features"
    staging = tmp_path / "staging"
    prepare_staging(staging, uri, incremental=True)  # nothing remote: an empty folder
    assert staging.is_dir() and list(staging.iterdir()) == []

    memory.pipe(f"{uri}/{contract.MANIFEST}", b"build 1")
    memory.pipe(f"{uri}/{STATE_JSON}", b'{"cut_ts": 5}')
    prepare_staging(staging, uri, incremental=True)  # downloaded
    assert (staging / STATE_JSON).read_bytes() == b'{"cut_ts": 5}'
    (staging / "local-only").write_text("kept while staging holds the remote build")
    prepare_staging(staging, uri, incremental=True)
    assert (staging / "local-only").exists()
    memory.pipe(f"{uri}/{contract.MANIFEST}", b"build 2")  # another node built since
    memory.pipe(f"{uri}/{STATE_JSON}", b'{"cut_ts": 9}')
    prepare_staging(staging, uri, incremental=True)
    assert not (staging / "local-only").exists()
    assert (staging / STATE_JSON).read_bytes() == b'{"cut_ts": 9}'
    prepare_staging(staging, uri, incremental=False)  # a full build starts empty
    assert list(staging.iterdir()) == []


def test_eventlog_files_through_a_uri(tmp_path, tables):
    import fsspec

    from features.build import eventlog_files, read_catalog

    memory = fsspec.filesystem("memory")
    root = f"memory://log-{tmp_path.name}/eventlog"
    t = tables(**LOG)
    for name, path in (("videos", "videos/date=1/part-0.parquet"), ("videos", "videos/part-1.parquet"),
                       ("videos", "videos/.part-2.parquet.tmp"), ("videos", "videos/_tmp/part-3.parquet")):
        with memory.open(f"{root}/{path}", "wb") as f:
            pq.write_table(t[name], f)
    files = eventlog_files(root, "videos")
    assert files == [f"/log-{tmp_path.name}/eventlog/videos/date=1/part-0.parquet",
                     f"/log-{tmp_path.name}/eventlog/videos/part-1.parquet"]
    assert read_catalog(root, "videos").equals(pa.concat_tables([t["videos"], t["videos"]]))
    assert eventlog_files(root, "comments") == []


def test_config_refuses_the_same_uri_and_a_remote_embedding_cache():
    with pytest.raises(ConfigError, match="differ"):
        FeaturesConfig(eventlog="s3://b/log", out="s3://b/log/")
    with pytest.raises(ConfigError, match="embed_cache.*local folder"):
        FeaturesConfig(eventlog="s3://b/log", out="s3://b/features", embed_cache="s3://b/cache")
    FeaturesConfig(eventlog="s3://b/log", out="s3://b/features")
