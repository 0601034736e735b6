"""The online sequence store, written by a child process of the consumer.

Why a process: the store's inserts, and the binding of every row to them, cost about as much CPU as all the rest
the consumer does per record, and they hold the GIL, so a writer thread gained nothing (issue 19). A child
process applies the consumer's batches on the other core while the consumer decodes the next poll.

Protocol: bytes over two pipes, a JSON header per message and Arrow IPC streams for the events; no pickles.
  parent -> child  {"op": "apply", "offsets": [[topic, partition, next_offset], ...], "produced_ms": [...],
                    "tables": [names]} followed by one Arrow IPC stream per named table;
                   {"op": "sync"}: the child answers once everything sent before it is committed.
  child -> parent  {"ready": true} once the store is open; {"offsets": ..., "freshness_ms": [...]} for each
                   sync; {"error": "..."} just before it exits on a failure.

Guarantees: batches are applied in the order they were sent, each with its source offsets in one transaction,
as SequenceStore.apply does in process. The consumer does not wait for the store before committing its Kafka
offsets; the child always finishes the batches it was sent, even once its parent is gone (it reads them up to the
pipe's end and ignores Ctrl-C), and a store left behind the group's commit (the child killed too, a power loss)
is what Ingestor.replay_store_gaps repairs. Backpressure: the parent blocks on the pipe while the child is
a batch behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

import pyarrow as pa

from core.paths import child_env
from ingestion.sequence_store import SequenceStore

FRESHNESS_SAMPLES = 200_000  # the newest event-to-readable delays kept for the consumer's percentiles


def _send_json(conn: Connection, obj) -> None:
    conn.send_bytes(json.dumps(obj).encode())


def _recv_json(conn: Connection):
    return json.loads(conn.recv_bytes())


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class StoreWriter:
    """The parent's side: start the child, send it batches, sync with it, stop it."""

    def __init__(self, path: str | Path, max_history: int, start_timeout_s: float = 120.0):
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestion.store_writer", str(to_child_read), str(from_child_write), str(path),
                 str(max_history)],
                pass_fds=(to_child_read, from_child_write), env=child_env(), stdin=subprocess.DEVNULL)
        finally:
            os.close(to_child_read)
            os.close(from_child_write)
        self.requests = Connection(to_child_write, readable=False)
        self.replies = Connection(from_child_read, writable=False)
        self.freshness_ms: deque = deque(maxlen=FRESHNESS_SAMPLES)
        self.closed = False
        if not self.replies.poll(start_timeout_s):
            self.stop()
            raise RuntimeError(f"the sequence store writer did not start within {start_timeout_s:.0f}s")
        self._reply()

    def _reply(self) -> dict:
        try:
            reply = _recv_json(self.replies)
        except EOFError:
            code = self.proc.wait(timeout=30)
            raise RuntimeError(f"the sequence store writer exited with code {code} (its error is on stderr)") from None
        if "error" in reply:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the sequence store writer failed: {reply['error']}")
        return reply

    def _send(self, parts: list[bytes]) -> None:
        if self.replies.poll():  # nothing is due before a sync: this is the child's error, or its end
            self._reply()
        try:
            for part in parts:
                self.requests.send_bytes(part)
        except OSError:  # BrokenPipeError: it is gone; its last words say why
            self._reply()
            raise

    def apply(self, tables: dict[str, pa.Table], offsets: dict[tuple[str, int], int], produced_ms: list[int]) -> None:
        """Queue a poll's valid events (table name -> rows, schema.ARROW_SCHEMA) with their source offsets."""
        names = [name for name, rows in tables.items() if rows.num_rows]
        header = {"op": "apply", "offsets": [[t, p, o] for (t, p), o in offsets.items()], "produced_ms": produced_ms,
                  "tables": names}
        self._send([json.dumps(header).encode(), *(to_ipc(tables[name]) for name in names)])

    def sync(self) -> dict[tuple[str, int], int]:
        """Wait until everything queued is committed; the store's offsets then. Collects the freshness samples."""
        self._send([b'{"op": "sync"}'])
        reply = self._reply()
        self.freshness_ms.extend(reply["freshness_ms"])
        return {(t, p): o for t, p, o in reply["offsets"]}

    def close(self) -> None:
        """Apply everything queued, then end the child."""
        if self.closed:
            return
        self.sync()
        self.stop()

    def stop(self, timeout_s: float = 60.0) -> None:
        """End the child without a sync: it still applies what it was sent (unless it is stuck for timeout_s)."""
        if self.closed:
            return
        self.closed = True
        self.requests.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()


# ------------------------------------------------------------------------------------------- the child


def serve(requests: Connection, replies: Connection, path: str, max_history: int) -> None:
    store = SequenceStore(path, max_history=max_history)
    freshness: deque = deque(maxlen=FRESHNESS_SAMPLES)
    _send_json(replies, {"ready": True})
    while True:
        try:
            header = _recv_json(requests)
        except EOFError:  # the parent closed its end (or died): everything it sent has been applied
            break
        if header["op"] == "sync":
            _send_json(replies, {"offsets": [[t, p, o] for (t, p), o in store.offsets().items()],
                                 "freshness_ms": list(freshness)})
            freshness.clear()
            continue
        try:
            tables = {name: from_ipc(requests.recv_bytes()) for name in header["tables"]}
        except EOFError:  # the parent died within a message: not applied, as it was never whole
            break
        columns = {name: [rows.to_pydict()] for name, rows in tables.items()}
        store.apply(columns.get("video_events", []), columns.get("comment_events", []),
                    {(t, p): o for t, p, o in header["offsets"]})
        now_ms = time.time() * 1000
        freshness.extend(now_ms - t for t in header["produced_ms"])
    store.close()


def main(argv: list[str]) -> None:
    """`python -m ingestion.store_writer REQUESTS_FD REPLIES_FD STORE_PATH MAX_HISTORY` (started by StoreWriter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the consumer, which then closes the pipe
    requests = Connection(int(argv[0]), writable=False)
    replies = Connection(int(argv[1]), readable=False)
    try:
        serve(requests, replies, argv[2], int(argv[3]))
    except BaseException:
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        try:
            _send_json(replies, {"error": error.strip().splitlines()[-1]})
        except OSError:
            pass
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
