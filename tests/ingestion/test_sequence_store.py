import pytest

from ingestion.sequence_store import SequenceStore, get_histories

T0 = 1_700_000_000_000


def _video(i, user="u1", action="like", ts=None):
    return {"event_id": f"v{i}", "user_id": user, "video_id": f"vid{i}", "action": action, "watch_ms": 5,
            "ts": T0 + i if ts is None else ts}


def _comment(i, user="u1"):
    return {"event_id": f"c{i}", "user_id": user, "comment_id": f"cm{i}", "video_id": f"vid{i}", "action": "like",
            "ts": T0 + i}


def _columns(records):
    """Records as one batch of columns (what schema.parse_batch returns)."""
    return [{name: [r[name] for r in records] for name in records[0]}] if records else []


def test_histories_are_bounded_newest_kept_oldest_first(tmp_path):
    store = SequenceStore(tmp_path / "s.sqlite", max_history=3)
    store.apply(_columns([_video(i) for i in (5, 1, 4)]), [], {("events.video", 0): 3})
    store.apply(_columns([_video(i) for i in (2, 3)] + [_video(9, action="view")]), _columns([_comment(7)]),
                {("events.video", 0): 6})
    h = store.get_histories("u1")
    # 5 positive events 1..5, keep the newest 3 (3, 4, 5) oldest first; the view (9) is not a positive action
    assert h["video_ids"] == ["vid3", "vid4", "vid5"]
    assert h["video_ts"] == [T0 + 3, T0 + 4, T0 + 5]
    assert h["comment_ids"] == ["cm7"] and h["comment_video_ids"] == ["vid7"]
    assert store.counts()["video_rows"] == 3
    assert store.get_histories("nobody")["video_ids"] == []


def test_replaying_events_changes_nothing_and_offsets_only_grow(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SequenceStore(path, max_history=2)
    batch = [_video(1), _video(2), _video(3, user="u2")]
    store.apply(_columns(batch), [], {("t", 0): 10})
    store.apply(_columns(batch + [_video(0)]), [], {("t", 0): 4})  # a replay from an older offset; v0 is older than both
    assert store.get_histories("u1")["video_ids"] == ["vid1", "vid2"]
    assert store.offsets() == {("t", 0): 10}
    store.close()
    # survives a reopen, and a read-only reader sees the same
    assert get_histories(path, "u2", max_history=2)["video_ids"] == ["vid3"]
    assert SequenceStore(path, max_history=2).offsets() == {("t", 0): 10}


def test_readonly_store_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError):
        SequenceStore(tmp_path / "missing.sqlite", readonly=True)


def test_pruning_reaches_every_user_over_the_bound_across_query_chunks(tmp_path):
    # 1,203 users (more than one chunk of the over-the-bound query): the even ones get 4 events, the odd ones 2
    store = SequenceStore(tmp_path / "s.sqlite", max_history=3)
    users = [f"u{n:05d}" for n in range(1_203)]
    events = [_video(n * 10 + k, user=user) for n, user in enumerate(users) for k in range(4 if n % 2 == 0 else 2)]
    store.apply(_columns(events), _columns([_comment(i, user=users[-1]) for i in range(5)]), {("t", 0): 1})
    assert store.counts()["video_rows"] == 602 * 3 + 601 * 2
    assert store.counts()["comment_rows"] == 3
    assert store.get_histories(users[0])["video_ids"] == ["vid1", "vid2", "vid3"]  # newest 3 of 0..3
    assert store.get_histories(users[1])["video_ids"] == ["vid10", "vid11"]
    assert store.get_histories(users[-1])["comment_ids"] == ["cm2", "cm3", "cm4"]
