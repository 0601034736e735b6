"""The online sequence store: each user's latest video and comment interactions, for serving.

Why SQLite (embedded, WAL mode) and not a server such as Redis:
- The data is small and keyed by user (max_history rows per user and kind); one indexed B-tree answers
  "the newest N rows of user u" in microseconds, and serving reads it from another process.
- WAL mode lets readers (serving) run while the consumer writes, without blocking either side.
- A transaction applies a batch of events and the Kafka offsets they came from together, so the store is its
  own snapshot: after a restart the consumer seeks each partition back to the store's offset when that is
  behind the group's committed offset (possible after a power loss with synchronous=NORMAL) and replays.
  Rows are keyed by event_id, so replaying a record is a no-op.
- Nothing to deploy or operate on a laptop or a Ray node; a Redis or a key-value service would add a process
  and a network hop for no gain at this size. The read API (`get_histories`) is the seam to swap it later.

Which events count: video histories hold the positive video actions (like, share, comment, finish: what the
features' hist_video holds); comment histories hold every comment action. Ids are raw strings; serving maps
them to item indices.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from ingestion.schema import POSITIVE_COMMENT_ACTIONS, POSITIVE_VIDEO_ACTIONS, Columns

_SCHEMA = """
CREATE TABLE IF NOT EXISTS video_hist (
    event_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, video_id TEXT NOT NULL, action TEXT NOT NULL,
    ts INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS video_hist_user ON video_hist (user_id, ts);
CREATE TABLE IF NOT EXISTS comment_hist (
    event_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, comment_id TEXT NOT NULL, video_id TEXT NOT NULL,
    action TEXT NOT NULL, ts INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS comment_hist_user ON comment_hist (user_id, ts);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)) WITHOUT ROWID;
"""


def _prune_sql(table: str) -> str:
    # Keep a user's newest `max_history` (?2) rows; ties on ts broken by event_id so that any replay order ends in
    # the same state. The subquery walks the (user_id, ts) index to the newest row beyond them (NULL, so nothing
    # is deleted, when the user has no more): a few index steps per user, no sort.
    return (f"DELETE FROM {table} WHERE user_id = ?1 AND (ts, event_id) <= (SELECT ts, event_id FROM {table} "
            f"WHERE user_id = ?1 ORDER BY ts DESC, event_id DESC LIMIT 1 OFFSET ?2)")


_USERS_PER_QUERY = 500  # bound parameters per statement stay far below SQLite's limit (999 before 3.32)


class SequenceStore:
    def __init__(self, path: str | Path, max_history: int = 50, readonly: bool = False):
        if max_history < 1:
            raise ValueError("max_history must be >= 1")
        self.path = Path(path)
        self.max_history = max_history
        self._lock = threading.Lock()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no sequence store at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a process crash loses nothing committed; a power loss may lose the last transactions,
            # which the offsets table then makes the consumer replay.
            self.db.execute("PRAGMA synchronous=NORMAL")
            # A batch of events touches index pages all over the file; checkpointing (copy into the database,
            # fsync) every 10,000 pages instead of SQLite's 1,000 writes each hot page once for many batches.
            self.db.execute("PRAGMA wal_autocheckpoint=10000")
            self.db.executescript(_SCHEMA)
        self.db.execute("PRAGMA busy_timeout=30000")  # several consumer processes may share one store

    def close(self) -> None:
        self.db.close()

    def apply(self, video_events: list[Columns], comment_events: list[Columns],
              offsets: dict[tuple[str, int], int]) -> None:
        """Add batches of clean events (schema.parse_batch columns) and record the next offset of each source
        partition, atomically."""
        videos = [row for c in video_events
                  for row in zip(c["event_id"], c["user_id"], c["video_id"], c["action"], c["ts"])
                  if row[3] in POSITIVE_VIDEO_ACTIONS]
        comments = [row for c in comment_events
                    for row in zip(c["event_id"], c["user_id"], c["comment_id"], c["video_id"], c["action"], c["ts"])
                    if row[4] in POSITIVE_COMMENT_ACTIONS]
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                if videos:
                    db.executemany("INSERT OR IGNORE INTO video_hist VALUES (?, ?, ?, ?, ?)", videos)
                    self._prune("video_hist", {v[1] for v in videos})
                if comments:
                    db.executemany("INSERT OR IGNORE INTO comment_hist VALUES (?, ?, ?, ?, ?, ?)", comments)
                    self._prune("comment_hist", {c[1] for c in comments})
                if offsets:
                    db.executemany(
                        "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition) "
                        "DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                        [(t, p, o) for (t, p), o in offsets.items()])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _prune(self, table: str, users: set[str]) -> None:
        # Only users over max_history have rows to drop: one counting query per chunk of users finds them (a
        # walk of each one's index range), instead of a DELETE statement per user, most of which drop nothing.
        ordered, over = sorted(users), []
        for start in range(0, len(ordered), _USERS_PER_QUERY):
            chunk = ordered[start:start + _USERS_PER_QUERY]
            over += [user for (user,) in self.db.execute(
                f"SELECT user_id FROM {table} WHERE user_id IN ({', '.join('?' * len(chunk))}) GROUP BY user_id "
                f"HAVING count(*) > ?", (*chunk, self.max_history))]
        if over:
            self.db.executemany(_prune_sql(table), [(user, self.max_history) for user in over])

    def offsets(self) -> dict[tuple[str, int], int]:
        """Next offset to apply per (topic, partition): where a replay after a restart starts at the latest."""
        with self._lock:
            return {(t, p): o for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM offsets")}

    def get_histories(self, user_id: str) -> dict:
        """A user's histories, oldest first, at most max_history each; empty lists for an unknown user."""
        n = self.max_history
        with self._lock:
            videos = self.db.execute(
                "SELECT video_id, action, ts FROM (SELECT video_id, action, ts, event_id FROM video_hist "
                "WHERE user_id = ? ORDER BY ts DESC, event_id DESC LIMIT ?) ORDER BY ts, event_id", (user_id, n)).fetchall()
            comments = self.db.execute(
                "SELECT comment_id, video_id, action, ts FROM (SELECT comment_id, video_id, action, ts, event_id "
                "FROM comment_hist WHERE user_id = ? ORDER BY ts DESC, event_id DESC LIMIT ?) ORDER BY ts, event_id",
                (user_id, n)).fetchall()
        return {
            "user_id": user_id,
            "video_ids": [r[0] for r in videos],
            "video_actions": [r[1] for r in videos],
            "video_ts": [r[2] for r in videos],
            "comment_ids": [r[0] for r in comments],
            "comment_video_ids": [r[1] for r in comments],
            "comment_actions": [r[2] for r in comments],
            "comment_ts": [r[3] for r in comments],
        }

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "video_rows": self.db.execute("SELECT count(*) FROM video_hist").fetchone()[0],
                "comment_rows": self.db.execute("SELECT count(*) FROM comment_hist").fetchone()[0],
                "users": self.db.execute(
                    "SELECT count(*) FROM (SELECT user_id FROM video_hist UNION SELECT user_id FROM comment_hist)").fetchone()[0],
            }


def get_histories(path: str | Path, user_id: str, max_history: int = 50) -> dict:
    """One-shot read for tools; serving should keep a SequenceStore(path, readonly=True) open instead."""
    store = SequenceStore(path, max_history=max_history, readonly=True)
    try:
        return store.get_histories(user_id)
    finally:
        store.close()
