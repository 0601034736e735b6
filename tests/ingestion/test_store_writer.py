"""The sequence store written by a child process: the same state as SequenceStore.apply in process."""

import pyarrow as pa
import pytest

from ingestion.schema import ARROW_SCHEMA
from ingestion.sequence_store import SequenceStore
from ingestion.store_writer import StoreWriter

T0 = 1_700_000_000_000


def _videos(rows):
    return pa.Table.from_pylist([{"event_id": f"v{i}", "user_id": user, "video_id": f"vid{i}", "action": action,
                                  "watch_ms": 5, "ts": T0 + i} for i, user, action in rows],
                                schema=ARROW_SCHEMA["video_events"])


def _comments(rows):
    return pa.Table.from_pylist([{"event_id": f"c{i}", "user_id": user, "comment_id": f"cm{i}", "video_id": f"vid{i}",
                                  "action": "like", "ts": T0 + i} for i, user in rows],
                                schema=ARROW_SCHEMA["comment_events"])


BATCHES = [
    ({"video_events": _videos([(5, "u1", "like"), (1, "u1", "like"), (4, "u2", "view")])}, {("ev", 0): 3}),
    ({"video_events": _videos([(2, "u1", "share"), (3, "u1", "finish"), (5, "u1", "like")]),
      "comment_events": _comments([(7, "u1"), (8, "u2")])}, {("ev", 0): 6, ("cm", 1): 2}),
    ({"comment_events": _comments([(9, "u2")])}, {("cm", 1): 1}),  # a replay from an older offset
]


def _in_process(path):
    store = SequenceStore(path, max_history=3)
    for tables, offsets in BATCHES:
        store.apply([tables["video_events"].to_pydict()] if "video_events" in tables else [],
                    [tables["comment_events"].to_pydict()] if "comment_events" in tables else [], offsets)
    return store


def test_child_process_store_equals_the_in_process_one(tmp_path):
    writer = StoreWriter(tmp_path / "child.sqlite", max_history=3)
    for tables, offsets in BATCHES:
        writer.apply(tables, offsets, produced_ms=[T0] * 2)
    assert writer.sync() == {("ev", 0): 6, ("cm", 1): 2}  # offsets only grow
    assert len(writer.freshness_ms) == 2 * len(BATCHES) and min(writer.freshness_ms) > 0
    writer.close()
    assert writer.proc.returncode == 0
    child, reference = SequenceStore(tmp_path / "child.sqlite", 3, readonly=True), _in_process(tmp_path / "ref.sqlite")
    for user in ("u1", "u2", "nobody"):
        assert child.get_histories(user) == reference.get_histories(user)
    assert child.get_histories("u1")["video_ids"] == ["vid2", "vid3", "vid5"]  # newest 3 positives, once each
    assert child.counts() == reference.counts()


def test_a_stopped_writer_still_applies_what_it_was_sent(tmp_path):
    writer = StoreWriter(tmp_path / "s.sqlite", max_history=3)
    for tables, offsets in BATCHES:
        writer.apply(tables, offsets, produced_ms=[])
    writer.stop()  # no sync: the consumer's end after an error, or its parent gone
    assert writer.proc.returncode == 0
    assert SequenceStore(tmp_path / "s.sqlite", 3, readonly=True).offsets() == {("ev", 0): 6, ("cm", 1): 2}


def test_a_writer_that_cannot_open_its_store_says_why(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RuntimeError, match="sequence store writer failed: .*Error"):
        StoreWriter(tmp_path / "a_file" / "s.sqlite", max_history=3)


def test_a_failing_apply_reaches_the_parent(tmp_path):
    writer = StoreWriter(tmp_path / "s.sqlite", max_history=3)
    wrong = pa.table({"event_id": ["x"]})  # not the contract's columns: the child's apply fails
    writer.apply({"video_events": wrong}, {("ev", 0): 1}, produced_ms=[])
    with pytest.raises(RuntimeError, match="sequence store writer failed: KeyError"):
        writer.sync()
    writer.stop()
    assert writer.proc.returncode == 1
