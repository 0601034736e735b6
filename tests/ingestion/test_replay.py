from ingestion.replay import _time_ordered


def test_unsorted_file_is_replayed_in_time_order_and_bad_lines_keep_their_place(tmp_path):
    path = tmp_path / "video_events.jsonl"
    path.write_text(
        '{"event_id":"a","user_id":"u1","ts":30}\n'
        '{"event_id":"b","user_id":"u2","ts":10}\n'
        "garbage\n"
        '{"event_id":"c","user_id":"u1","ts":20}\n'
        "\n"
    )
    rows = list(_time_ordered(path, "video_events"))
    # "garbage" has no ts and inherits the one before it (10), so it travels right after b
    assert [r[4] for r in rows] == [
        b'{"event_id":"b","user_id":"u2","ts":10}',
        b"garbage",
        b'{"event_id":"c","user_id":"u1","ts":20}',
        b'{"event_id":"a","user_id":"u1","ts":30}',
    ]
    assert [r[3] for r in rows] == [b"u2", None, b"u1", b"u1"]
