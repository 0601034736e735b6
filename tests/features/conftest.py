"""Tiny hand-written event logs in the exact event-log schema (docs/DATA.md section 2)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingestion.schema import ARROW_SCHEMA


def make_tables(videos=(), comments=(), video_events=(), comment_events=()) -> dict[str, pa.Table]:
    """Rows as tuples in schema order, without author_id / watch_ms (filled in here)."""
    rows = {
        "videos": [dict(video_id=v, title=t, tags=list(g), author_id="a", ts=ts) for v, t, g, ts in videos],
        "comments": [dict(comment_id=c, video_id=v, author_id="a", text=x, parent_id=None, ts=ts)
                     for c, v, x, ts in comments],
        "video_events": [dict(event_id=e, user_id=u, video_id=v, action=a, watch_ms=None, ts=ts)
                         for e, u, v, a, ts in video_events],
        "comment_events": [dict(event_id=e, user_id=u, comment_id=c, video_id=v, action=a, ts=ts)
                           for e, u, c, v, a, ts in comment_events],
    }
    return {name: pa.Table.from_pylist(r, schema=ARROW_SCHEMA[name]) for name, r in rows.items()}


def write_eventlog(root: Path, tables: dict[str, pa.Table], parts: int = 2) -> Path:
    """EVENTLOG/<table>/part-<n>.parquet, each table split over `parts` files; empty tables get no folder."""
    for name, table in tables.items():
        if len(table) == 0:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        step = max(1, -(-len(table) // parts))
        for n, start in enumerate(range(0, len(table), step)):
            pq.write_table(table.slice(start, step), root / name / f"part-{n}.parquet")
    return root


@pytest.fixture
def tables():
    return make_tables


@pytest.fixture
def eventlog_writer():
    return write_eventlog
