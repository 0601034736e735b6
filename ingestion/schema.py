"""The data contract (DESIGN.md section 4, docs/DATA.md sections 1-2): four tables, their topics and keys,
their Arrow types, and the validation of one record.

`parse` turns raw bytes from a file line or a Kafka message into a clean record or raises `InvalidRecord`,
whose `.reason` is a short stable string (it is what the dead-letter topic and the counters carry).
`parse_batch` does the same for a whole Kafka poll at once and returns columns (what the event log and the
sequence store write); it gives exactly what `parse` gives on each record, only faster.
"""

from __future__ import annotations

import json
from operator import itemgetter
from typing import Any, Sequence

import pyarrow as pa

try:  # a JSON decoder in C, about 3 times faster than json per record (parse_batch); optional, same decisions
    import msgspec
except ImportError:  # pragma: no cover - pinned in requirements.txt; an older venv falls back to json alone
    msgspec = None

TABLES = ("videos", "comments", "video_events", "comment_events")

TOPIC_OF = {
    "videos": "catalog.videos",
    "comments": "catalog.comments",
    "video_events": "events.video",
    "comment_events": "events.comment",
}
DEAD_LETTER_TOPIC = "dead-letter"

# Kafka message key: events are keyed by user so that one user's events stay in order on one partition.
KEY_FIELD = {"videos": "video_id", "comments": "comment_id", "video_events": "user_id", "comment_events": "user_id"}
# A row's identity in the event log: the log holds each at most once.
ID_FIELD = {"videos": "video_id", "comments": "comment_id", "video_events": "event_id", "comment_events": "event_id"}

VIDEO_ACTIONS = frozenset({"view", "like", "share", "comment", "finish"})
COMMENT_ACTIONS = frozenset({"like", "reply", "write"})
POSITIVE_VIDEO_ACTIONS = frozenset({"like", "share", "comment", "finish"})
POSITIVE_COMMENT_ACTIONS = frozenset(COMMENT_ACTIONS)
ACTIONS = {"video_events": VIDEO_ACTIONS, "comment_events": COMMENT_ACTIONS}

ARROW_SCHEMA = {
    "videos": pa.schema([
        ("video_id", pa.string()),
        ("title", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("author_id", pa.string()),
        ("ts", pa.int64()),
    ]),
    "comments": pa.schema([
        ("comment_id", pa.string()),
        ("video_id", pa.string()),
        ("author_id", pa.string()),
        ("text", pa.string()),
        ("parent_id", pa.string()),  # null for a top-level comment
        ("ts", pa.int64()),
    ]),
    "video_events": pa.schema([
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("video_id", pa.string()),
        ("action", pa.string()),
        ("watch_ms", pa.int64()),  # null when unknown
        ("ts", pa.int64()),
    ]),
    "comment_events": pa.schema([
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("comment_id", pa.string()),
        ("video_id", pa.string()),
        ("action", pa.string()),
        ("ts", pa.int64()),
    ]),
}

# Field kinds, in contract order (the order of ARROW_SCHEMA):
#   id: non-empty str (an int becomes its decimal string); str: any str; tags: list of str;
#   opt_id: id or null; opt_count: int in [0, 2**63) or null; ts: int ms in range; action: one of the table's
#   actions. Every str (ids, texts, tags) must be encodable as UTF-8: JSON's "\ud800" escape decodes to a lone
#   surrogate, which Arrow, Parquet and SQLite cannot store.
# Nullable fields may be left out and then mean null; every other field is required.
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "videos": (("video_id", "id"), ("title", "str"), ("tags", "tags"), ("author_id", "id"), ("ts", "ts")),
    "comments": (
        ("comment_id", "id"), ("video_id", "id"), ("author_id", "id"), ("text", "str"),
        ("parent_id", "opt_id"), ("ts", "ts"),
    ),
    "video_events": (
        ("event_id", "id"), ("user_id", "id"), ("video_id", "id"), ("action", "action"),
        ("watch_ms", "opt_count"), ("ts", "ts"),
    ),
    "comment_events": (
        ("event_id", "id"), ("user_id", "id"), ("comment_id", "id"), ("video_id", "id"), ("action", "action"),
        ("ts", "ts"),
    ),
}

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z (exclusive); catches seconds or microseconds sent as ms
MAX_RECORD_BYTES = 65_536
MAX_INT64 = 2**63 - 1  # the Arrow type of every integer field; JSON integers have no bound


class InvalidRecord(ValueError):
    """A record that breaks the contract. `reason` is a short machine string, the message says what and where."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _check_table(table: str) -> None:
    if table not in FIELDS:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")


def _is_utf8(text: str) -> bool:
    """Whether `text` can be stored (as UTF-8): false when it holds a surrogate code point."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_text(name: str, value: str) -> str:
    if not _is_utf8(value):
        raise InvalidRecord(f"bad_text:{name}", f"{name} holds a lone surrogate (not encodable as UTF-8)")
    return value


def _as_id(name: str, value: Any) -> str:
    # bool is an int subclass; True as an id is a producer bug, not the id "1".
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRecord(f"wrong_type:{name}", f"{name} must be a string or an integer, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise InvalidRecord("empty_id", f"{name} is empty")
    return _as_text(name, text)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord(f"wrong_type:{name}", f"{name} must be an integer, got {type(value).__name__}")
    return value


def _clean_field(table: str, name: str, kind: str, value: Any) -> Any:
    if kind == "id":
        return _as_id(name, value)
    if kind == "opt_id":
        return None if value is None else _as_id(name, value)
    if kind == "str":
        if not isinstance(value, str):
            raise InvalidRecord(f"wrong_type:{name}", f"{name} must be a string, got {type(value).__name__}")
        return _as_text(name, value)
    if kind == "tags":
        if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
            raise InvalidRecord(f"wrong_type:{name}", f"{name} must be a list of strings")
        for tag in value:
            _as_text(name, tag)
        return list(value)
    if kind == "opt_count":
        if value is None:
            return None
        count = _as_int(name, value)
        if count < 0:
            raise InvalidRecord(f"negative:{name}", f"{name} must be >= 0, got {count}")
        if count > MAX_INT64:
            raise InvalidRecord(f"too_large:{name}", f"{name} must be < 2**63 (a 64-bit integer), got {count}")
        return count
    if kind == "ts":
        ts = _as_int(name, value)
        if not MIN_TS_MS <= ts < MAX_TS_MS:
            raise InvalidRecord("bad_timestamp", f"{name}={ts} is not epoch milliseconds in [2000, 2100)")
        return ts
    if kind == "action":
        if not isinstance(value, str):
            raise InvalidRecord(f"wrong_type:{name}", f"{name} must be a string, got {type(value).__name__}")
        if value not in ACTIONS[table]:
            raise InvalidRecord("unknown_action", f"{value!r} is not one of {sorted(ACTIONS[table])}")
        return value
    raise AssertionError(f"unknown field kind {kind}")


def validate(table: str, record: dict) -> dict:
    """Return a clean copy of `record`: exactly the contract fields of `table`, typed; extra fields dropped."""
    _check_table(table)
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object", f"a {table} record must be a JSON object, got {type(record).__name__}")
    clean = {}
    for name, kind in FIELDS[table]:
        if name not in record:
            if kind.startswith("opt_"):
                clean[name] = None
                continue
            raise InvalidRecord(f"missing_field:{name}", f"{table} record has no {name}")
        clean[name] = _clean_field(table, name, kind, record[name])
    return clean


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every record: json.loads with a keyword argument builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(raw: bytes | bytearray | memoryview | str, max_bytes: int) -> Any:
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise InvalidRecord("oversized", f"record has {len(data)} bytes, the limit is {max_bytes}")
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InvalidRecord("malformed_json", f"not UTF-8 JSON: {err}") from None


def parse(table: str, raw: bytes | bytearray | memoryview | str, max_bytes: int = MAX_RECORD_BYTES) -> dict:
    """Decode one raw record (a JSON line or a Kafka message value) and validate it."""
    _check_table(table)
    return validate(table, _decode(raw, max_bytes))


Columns = dict[str, list]  # a batch of clean records: one list per contract field, in contract order
_NONE = type(None)


def _clean_column(table: str, kind: str, values: list) -> list | None:
    """`values` cleaned as _clean_field cleans each one, or None when any of them breaks the contract."""
    types = set(map(type, values))  # exact types: bool is not int here, as in _clean_field
    if kind in ("id", "opt_id"):
        if not types <= ({str, int, _NONE} if kind == "opt_id" else {str, int}):
            return None
        if int in types:
            values = [str(v) if type(v) is int else v for v in values]
        present = [v for v in values if v is not None] if _NONE in types else values
        return values if all(map(str.strip, present)) and _is_utf8("".join(present)) else None
    if kind == "str":
        return values if types <= {str} and _is_utf8("".join(values)) else None
    if kind == "tags":
        if types <= {list} and all(type(tag) is str for tags in values for tag in tags) and \
                _is_utf8("".join(tag for tags in values for tag in tags)):
            return [list(tags) for tags in values]
        return None
    if kind == "opt_count":
        counts = [v for v in values if v is not None] if _NONE in types else values
        ok = types <= {int, _NONE} and (not counts or (min(counts) >= 0 and max(counts) <= MAX_INT64))
        return values if ok else None
    if kind == "ts":
        return values if types <= {int} and MIN_TS_MS <= min(values) and max(values) < MAX_TS_MS else None
    if kind == "action":
        return values if types <= {str} and set(values) <= ACTIONS[table] else None
    raise AssertionError(f"unknown field kind {kind}")


def _validate_columns(table: str, records: list) -> Columns | None:
    """Validate whole columns at once (C loops over each field); None if any record is bad."""
    if not records or not set(map(type, records)) <= {dict}:
        return None
    columns = {}
    for name, kind in FIELDS[table]:
        try:
            values = [r.get(name) for r in records] if kind.startswith("opt_") else list(map(itemgetter(name), records))
        except KeyError:
            return None
        columns[name] = _clean_column(table, kind, values)
        if columns[name] is None:
            return None
    return columns


# msgspec's decoder accepts a subset of what json accepts, with equal values, except near the recursion limit:
# it nests a few levels deeper. A record of at most this many bytes, or with at most half as many brackets,
# cannot nest deep enough for either to fail (json fails at about 990 levels).
_FAST_NESTING_BYTES = 1_000
_FAST_DECODE = msgspec.json.Decoder().decode if msgspec is not None else None


def _decode_all(raws: Sequence[bytes], max_bytes: int) -> tuple[list, list[int], list[tuple[int, str]]]:
    """Decode each raw record: (the decoded ones, their indexes, (index, reason) of the others), as `_decode`
    decides. msgspec decodes when it can; json decides every record msgspec refuses (lone surrogates, numbers
    out of its range, bad JSON) or might decode differently (deep nesting), so the decisions are json's."""
    records, where, bad = [], [], []
    fast = _FAST_DECODE
    append, at = records.append, where.append
    for i, raw in enumerate(raws):
        if fast is not None and type(raw) is bytes and len(raw) <= max_bytes and (
                len(raw) <= _FAST_NESTING_BYTES or raw.count(b"[") + raw.count(b"{") <= _FAST_NESTING_BYTES // 2):
            try:
                append(fast(raw))
                at(i)
                continue
            except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
                pass
        try:
            append(_decode(raw, max_bytes))
            at(i)
        except InvalidRecord as err:
            bad.append((i, err.reason))
    return records, where, bad


def parse_batch(table: str, raws: Sequence[bytes],
                max_bytes: int = MAX_RECORD_BYTES) -> tuple[Columns, list[tuple[int, str]]]:
    """`parse` over many records: (the valid ones as columns, in order; (index, reason) of each bad one).

    The checks run column by column over the whole batch; when some record fails them, the batch is validated
    again record by record, which finds the bad ones and their reasons exactly as `parse` would.
    """
    _check_table(table)
    records, where, bad = _decode_all(raws, max_bytes)
    columns = _validate_columns(table, records)
    if columns is None:
        rows = []
        for i, record in zip(where, records):
            try:
                rows.append(validate(table, record))
            except InvalidRecord as err:
                bad.append((i, err.reason))
        columns = {name: [row[name] for row in rows] for name, _ in FIELDS[table]}
        bad.sort()
    return columns, bad


def to_json_line(record: dict) -> str:
    """Compact JSON for one record, without the newline (UTF-8 text kept as is)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)
