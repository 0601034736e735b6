"""The serve benchmark's own parts: its HTTP response reader, its requests and how it picks the headline level."""

import asyncio
import json

import pytest

from benchmarks.serve import headline_concurrency, read_response, video_request


def _read(raw: bytes, n: int) -> tuple[list[tuple[int, bytes]], bytes]:
    """n responses read from one stream, and what is left of it."""
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return [await read_response(reader) for _ in range(n)], await reader.read()

    return asyncio.run(go())


def test_reads_back_to_back_responses_by_content_length_and_chunks():
    raw = (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: application/json\r\n\r\nhello"
           b"HTTP/1.1 422 Unprocessable Entity\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\nwiki\r\n6;ext=1\r\npedia!\r\n0\r\n\r\n"
           b"HTTP/1.1 204 No Content\r\nserver: x\r\n\r\n")
    assert _read(raw, 3) == ([(200, b"hello"), (422, b"wikipedia!"), (204, b"")], b"")


def test_a_response_cut_short_raises():
    with pytest.raises(asyncio.IncompleteReadError):
        _read(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 1)


def test_video_request_is_a_complete_post_with_its_length():
    raw = video_request("127.0.0.1", 8000, "u000007", k=3)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/recommend/videos HTTP/1.1"
    assert "Host: 127.0.0.1:8000" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"user_id": "u000007", "k": 3}


def test_headline_is_the_busiest_level_within_the_p99_target():
    figures = {"rps_c1": 40, "p99_ms_c1": 30, "rps_c8": 250, "p99_ms_c8": 60,
               "rps_c16": 320, "p99_ms_c16": 95, "rps_c32": 340, "p99_ms_c32": 180}
    assert headline_concurrency(figures, (1, 8, 16, 32), 100.0) == 16
    assert headline_concurrency(figures, (1, 8, 16, 32), 50.0) == 1
    # no level meets it: the top level, so the figure is never better than measured
    assert headline_concurrency(figures, (8, 16, 32), 10.0) == 32
