import json

import pyarrow as pa
import pytest

from ingestion import schema
from ingestion.schema import InvalidRecord, parse, parse_batch, to_json_line, validate

TS = 1_700_000_000_000

GOOD = {
    "videos": {"video_id": "v1", "title": "Crispy pasta", "tags": ["cooking", "food"], "author_id": "u9", "ts": TS},
    "comments": {"comment_id": "c1", "video_id": "v1", "author_id": "u2", "text": "wow", "parent_id": None, "ts": TS},
    "video_events": {"event_id": "e1", "user_id": "u1", "video_id": "v1", "action": "finish", "watch_ms": 12000,
                     "ts": TS},
    "comment_events": {"event_id": "e2", "user_id": "u1", "comment_id": "c1", "video_id": "v1", "action": "like",
                       "ts": TS},
}


DROP = object()  # marks a field to leave out


def raw(table, **changes):
    """GOOD[table] with some fields changed or dropped, as JSON bytes."""
    record = dict(GOOD[table])
    for key, value in changes.items():
        if value is DROP:
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record).encode()


def test_contract_constants():
    assert schema.TABLES == ("videos", "comments", "video_events", "comment_events")
    assert schema.TOPIC_OF == {"videos": "catalog.videos", "comments": "catalog.comments",
                               "video_events": "events.video", "comment_events": "events.comment"}
    assert schema.DEAD_LETTER_TOPIC == "dead-letter"
    assert schema.KEY_FIELD == {"videos": "video_id", "comments": "comment_id", "video_events": "user_id",
                                "comment_events": "user_id"}
    assert schema.ID_FIELD == {"videos": "video_id", "comments": "comment_id", "video_events": "event_id",
                               "comment_events": "event_id"}
    assert schema.VIDEO_ACTIONS == {"view", "like", "share", "comment", "finish"}
    assert schema.COMMENT_ACTIONS == {"like", "reply", "write"}
    assert schema.POSITIVE_VIDEO_ACTIONS == {"like", "share", "comment", "finish"}
    assert schema.POSITIVE_COMMENT_ACTIONS == {"like", "reply", "write"}


def test_arrow_schemas_match_docs():
    s = schema.ARROW_SCHEMA
    assert s["videos"] == pa.schema([("video_id", pa.string()), ("title", pa.string()),
                                     ("tags", pa.list_(pa.string())), ("author_id", pa.string()), ("ts", pa.int64())])
    assert s["comments"] == pa.schema([("comment_id", pa.string()), ("video_id", pa.string()),
                                       ("author_id", pa.string()), ("text", pa.string()),
                                       ("parent_id", pa.string()), ("ts", pa.int64())])
    assert s["video_events"] == pa.schema([("event_id", pa.string()), ("user_id", pa.string()),
                                           ("video_id", pa.string()), ("action", pa.string()),
                                           ("watch_ms", pa.int64()), ("ts", pa.int64())])
    assert s["comment_events"] == pa.schema([("event_id", pa.string()), ("user_id", pa.string()),
                                             ("comment_id", pa.string()), ("video_id", pa.string()),
                                             ("action", pa.string()), ("ts", pa.int64())])


@pytest.mark.parametrize("table", schema.TABLES)
def test_good_record_passes_unchanged_and_fits_arrow(table):
    clean = parse(table, json.dumps(GOOD[table]).encode())
    assert clean == GOOD[table]
    assert list(clean) == schema.ARROW_SCHEMA[table].names
    arrow = pa.Table.from_pylist([clean], schema=schema.ARROW_SCHEMA[table])
    assert arrow.num_rows == 1


def test_numbers_as_ids_become_decimal_strings_and_extra_fields_are_dropped():
    clean = validate("comment_events", {"event_id": 17, "user_id": 4, "comment_id": 120, "video_id": "v1",
                                        "action": "reply", "ts": TS, "client": "ios", "debug": {"x": 1}})
    assert clean == {"event_id": "17", "user_id": "4", "comment_id": "120", "video_id": "v1", "action": "reply",
                     "ts": TS}


def test_nullable_fields_may_be_null_or_missing():
    assert parse("comments", raw("comments", parent_id=DROP))["parent_id"] is None
    assert parse("comments", raw("comments", parent_id=55))["parent_id"] == "55"
    assert parse("video_events", raw("video_events", watch_ms=None))["watch_ms"] is None
    assert parse("video_events", raw("video_events", watch_ms=DROP))["watch_ms"] is None
    assert parse("video_events", raw("video_events", watch_ms=0))["watch_ms"] == 0
    assert parse("videos", raw("videos", tags=[]))["tags"] == []


def test_timestamp_bounds():
    assert parse("videos", raw("videos", ts=946_684_800_000))["ts"] == 946_684_800_000  # 2000-01-01
    assert parse("videos", raw("videos", ts=4_102_444_799_999))["ts"] == 4_102_444_799_999
    with pytest.raises(InvalidRecord) as err:
        parse("videos", raw("videos", ts=4_102_444_800_000))  # 2100-01-01 is excluded
    assert err.value.reason == "bad_timestamp"


BAD = [
    ("videos", b"{not json", "malformed_json"),
    ("videos", b'{"video_id": "v1", ', "malformed_json"),
    ("videos", b"\xff\xfe{}", "malformed_json"),
    ("videos", raw("videos").replace(str(TS).encode(), b"NaN"), "malformed_json"),
    ("videos", b"[1, 2]", "not_an_object"),
    ("comments", b'"just text"', "not_an_object"),
    ("videos", raw("videos", title=DROP), "missing_field:title"),
    ("comment_events", raw("comment_events", comment_id=DROP), "missing_field:comment_id"),
    ("videos", raw("videos", ts="1700000000000"), "wrong_type:ts"),
    ("videos", raw("videos", ts=1.7e12), "wrong_type:ts"),
    ("videos", raw("videos", ts=True), "wrong_type:ts"),
    ("video_events", raw("video_events", ts=1_700_000_000), "bad_timestamp"),  # seconds, not ms
    ("video_events", raw("video_events", ts=-5), "bad_timestamp"),
    ("video_events", raw("video_events", ts=1_700_000_000_000_000), "bad_timestamp"),  # microseconds
    ("video_events", raw("video_events", action="dislike"), "unknown_action"),
    ("comment_events", raw("comment_events", action="view"), "unknown_action"),  # a video action
    ("video_events", raw("video_events", action=3), "wrong_type:action"),
    ("videos", raw("videos", video_id=""), "empty_id"),
    ("video_events", raw("video_events", user_id="   "), "empty_id"),
    ("comments", raw("comments", parent_id=""), "empty_id"),
    ("video_events", raw("video_events", user_id=True), "wrong_type:user_id"),
    ("videos", raw("videos", video_id=1.5), "wrong_type:video_id"),
    ("comments", raw("comments", author_id=None), "wrong_type:author_id"),
    ("comments", raw("comments", parent_id=["c0"]), "wrong_type:parent_id"),
    ("videos", raw("videos", tags="cooking,food"), "wrong_type:tags"),
    ("videos", raw("videos", tags=["cooking", 7]), "wrong_type:tags"),
    ("videos", raw("videos", title=None), "wrong_type:title"),
    ("comments", raw("comments", text={"en": "wow"}), "wrong_type:text"),
    ("video_events", raw("video_events", watch_ms=-1), "negative:watch_ms"),
    ("video_events", raw("video_events", watch_ms="1200"), "wrong_type:watch_ms"),
    ("comments", raw("comments", text="x" * 70_000), "oversized"),
    # valid JSON that Arrow, Parquet and SQLite cannot hold: an int64 overflow, a lone surrogate ("\ud800")
    ("video_events", raw("video_events", watch_ms=2**63), "too_large:watch_ms"),
    ("video_events", raw("video_events", watch_ms=10**30), "too_large:watch_ms"),
    ("video_events", raw("video_events", ts=2**63), "bad_timestamp"),
    ("videos", raw("videos", ts=10**30), "bad_timestamp"),
    ("videos", raw("videos", title="Crispy \ud800 pasta"), "bad_text:title"),
    ("comments", raw("comments", text="\udc00"), "bad_text:text"),
    ("videos", raw("videos", tags=["cooking", "\udfff"]), "bad_text:tags"),
    ("video_events", raw("video_events", user_id="u\ud83d"), "bad_text:user_id"),
    ("comments", raw("comments", parent_id="\ud800"), "bad_text:parent_id"),
    ("comment_events", raw("comment_events", action="like\ud800"), "unknown_action"),
]


@pytest.mark.parametrize(("table", "data", "reason"), BAD)
def test_bad_record_is_rejected_with_its_reason(table, data, reason):
    with pytest.raises(InvalidRecord) as err:
        parse(table, data)
    assert err.value.reason == reason
    assert str(err.value).startswith(reason + ": ")
    assert isinstance(err.value, ValueError)


def test_size_limit_is_inclusive():
    data = raw("videos")
    assert parse("videos", data, max_bytes=len(data))["video_id"] == "v1"
    with pytest.raises(InvalidRecord) as err:
        parse("videos", data, max_bytes=len(data) - 1)
    assert err.value.reason == "oversized"


def test_validate_rejects_non_objects_and_parse_accepts_text():
    with pytest.raises(InvalidRecord) as err:
        validate("videos", ["v1"])
    assert err.value.reason == "not_an_object"
    assert parse("videos", raw("videos").decode())["title"] == "Crispy pasta"


def test_unknown_table_is_a_caller_error_not_a_bad_record():
    with pytest.raises(ValueError, match="unknown table") as err:
        validate("users", {})
    assert not isinstance(err.value, InvalidRecord)
    with pytest.raises(ValueError, match="unknown table"):
        parse("users", b"{}")


def test_to_json_line_is_compact_and_round_trips():
    record = {"comment_id": "c1", "video_id": "v1", "author_id": "u2", "text": "très bien", "parent_id": None,
              "ts": TS}
    line = to_json_line(record)
    assert line == ('{"comment_id":"c1","video_id":"v1","author_id":"u2","text":"très bien","parent_id":null,'
                    '"ts":1700000000000}')
    assert parse("comments", line.encode("utf-8")) == record


@pytest.mark.parametrize(("table", "data", "reason"), BAD)
def test_parse_batch_finds_each_bad_record_between_good_ones(table, data, reason):
    good = json.dumps(GOOD[table]).encode()
    valid, bad = parse_batch(table, [good, data, good])
    assert bad == [(1, reason)]
    assert valid == {name: [GOOD[table][name]] * 2 for name in schema.ARROW_SCHEMA[table].names}


def test_parse_batch_of_good_records_equals_parse_of_each():
    # ints as ids, left-out and null optionals, extra fields, empty tags, several days: all through the column path
    raws = {
        "videos": [raw("videos"), raw("videos", video_id=7, tags=[], author_id=12, extra={"a": 1})],
        "comments": [raw("comments"), raw("comments", parent_id=DROP, comment_id=3), raw("comments", parent_id=9)],
        "video_events": [raw("video_events"), raw("video_events", watch_ms=DROP, event_id=5, ts=TS + 86_400_000),
                         raw("video_events", watch_ms=None, action="view", user_id=0)],
        "comment_events": [raw("comment_events"), raw("comment_events", action="write", client="ios")],
    }
    for table, batch in raws.items():
        valid, bad = parse_batch(table, batch)
        assert bad == []
        rows = [parse(table, r) for r in batch]
        assert valid == {name: [row[name] for row in rows] for name in schema.ARROW_SCHEMA[table].names}
        assert list(valid) == schema.ARROW_SCHEMA[table].names


def test_edge_values_that_fit_pass_both_paths_and_build_arrow_tables():
    # the int64 maximum, an astral character (JSON's surrogate pair escape), a lone surrogate in an extra field
    batch = [raw("video_events", watch_ms=2**63 - 1), raw("video_events", user_id="u\U0001f600"),
             raw("video_events", note="\ud800")]
    assert b"\\ud83d\\ude00" in batch[1]
    rows = [parse("video_events", r) for r in batch]
    assert rows[0]["watch_ms"] == 2**63 - 1 and rows[1]["user_id"] == "u\U0001f600"
    valid, bad = parse_batch("video_events", batch)
    assert bad == []
    assert valid == {name: [row[name] for row in rows] for name in schema.ARROW_SCHEMA["video_events"].names}
    assert pa.Table.from_pydict(valid, schema=schema.ARROW_SCHEMA["video_events"]).num_rows == 3


def test_every_clean_record_fits_arrow_and_bad_ones_never_reach_the_columns():
    for table in schema.TABLES:
        batch = [json.dumps(GOOD[table]).encode()] + [data for t, data, _ in BAD if t == table]
        valid, bad = parse_batch(table, batch)
        assert len(bad) == len(batch) - 1
        assert pa.Table.from_pydict(valid, schema=schema.ARROW_SCHEMA[table]).num_rows == 1


def _extra(table, text: str) -> bytes:
    """GOOD[table] as JSON with `text` (raw JSON) as the value of an extra field."""
    return raw(table)[:-1] + b', "extra": ' + text.encode() + b"}"


# JSON that json and msgspec (parse_batch's fast decoder) might take differently; parse_batch must decide as parse
EDGE = [
    _extra("video_events", "1e400"),  # json: inf, valid; msgspec refuses the number
    _extra("video_events", "-" + "1" * 4300),  # json: valid; msgspec refuses the integer
    _extra("video_events", "1" * 4301),  # over json's 4,300 digits: malformed_json
    _extra("video_events", '"\\ud800"'),  # a lone surrogate in an extra field: kept out, valid
    _extra("video_events", "[" * 900 + "]" * 900),  # deep but within the recursion limit: valid
    _extra("video_events", "[" * 1100 + "]" * 1100),  # past it: malformed_json
    _extra("video_events", '"café"'),  # UTF-8 beyond ASCII: valid
    _extra("video_events", '"x"').replace(b'"x"', b'"\xe9"'),  # Latin-1, not UTF-8: malformed_json
    _extra("video_events", '"\\u0000"'),
    _extra("video_events", "-0.0"),
    raw("video_events")[:-1] + b', "ts": "late"}',  # duplicate key: the last one counts (wrong_type:ts)
    raw("video_events", ts="early")[:-1] + b', "ts": 1700000000000}',  # the last one is fine: valid
    raw("video_events").replace(b", ", b",\n\t ") + b"\r\n",  # JSON whitespace
    b"\xef\xbb\xbf" + raw("video_events"),  # a byte-order mark: malformed_json
    raw("video_events") + b"\x00",
    raw("video_events", watch_ms=1.0),
    raw("video_events", watch_ms=10**19),  # beyond int64 but within uint64
]


@pytest.mark.parametrize("fast", [True, False], ids=["msgspec", "json"])
def test_parse_batch_decides_edge_json_as_parse(fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(schema, "_FAST_DECODE", None)
    elif schema._FAST_DECODE is None:
        pytest.skip("msgspec is not installed")
    good = raw("video_events")
    batch = [good, *EDGE, good]
    want_rows, want_bad = [], []
    for i, data in enumerate(batch):
        try:
            want_rows.append(parse("video_events", data))
        except InvalidRecord as err:
            want_bad.append((i, err.reason))
    assert len(want_rows) >= 8 and len(want_bad) >= 6  # both kinds are exercised
    valid, bad = parse_batch("video_events", batch)
    assert bad == want_bad
    assert valid == {name: [row[name] for row in want_rows] for name in schema.ARROW_SCHEMA["video_events"].names}


def test_parse_batch_of_nothing():
    assert parse_batch("video_events", []) == ({name: [] for name in schema.ARROW_SCHEMA["video_events"].names}, [])
