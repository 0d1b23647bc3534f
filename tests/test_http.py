"""HTTP hardening (router/http.py) through the web channel served for real on loopback.

Slow and idle clients, connection floods, malformed requests, compressed and
abandoned bodies, and a store that cannot write. Each test here failed before
router/http.py existed (see the commit that added it).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import gzip
import io
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

import channels.web
import router.logging as rlog
from router.config import load_config
from router.daemon import ensure_admin_token
from router.http import AcceptErrorLog, _GuardedHandler
from router.logging import clear_secrets, configure_logging, mask_secrets
from router.model import InboundMessage
from tests.test_channel_web import MESSAGE, FakePipeline, serve

HEAD = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


@pytest.fixture
async def pipeline() -> FakePipeline:
    """Return a fresh in-memory pipeline."""
    return FakePipeline()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Send every log line, debug included, to a StringIO; restore logging afterwards."""
    clear_secrets()
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("debug", stream=stream, json=True, cache=False)
    yield stream
    clear_secrets()
    if rlog._handler is not None:
        root.removeHandler(rlog._handler)
        rlog._handler = None
    root.setLevel(level)
    structlog.reset_defaults()


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    """Return the JSON log lines written so far."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a new connection and return everything read until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    """Split a raw HTTP answer into status, headers (lower-case names) and JSON body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)


def port_of(url: str) -> int:
    """Return the port of a base URL."""
    return int(url.rsplit(":", 1)[1])


# -- slow clients ----------------------------------------------------------------------


async def test_request_head_not_finished_in_time_is_closed(
    pipeline: FakePipeline, tmp_path: Path
) -> None:
    """A connection whose headers never finish is closed after read_timeout (was: an hour)."""
    async with serve(pipeline, tmp_path, read_timeout=0.5) as (_, url):
        started = time.monotonic()
        answer = await exchange(port_of(url), HEAD, timeout=5)
        assert answer == b""
        assert time.monotonic() - started < 3


async def test_body_not_finished_in_time_is_408(pipeline: FakePipeline, tmp_path: Path) -> None:
    """A body that stops arriving gets a JSON 408 after read_timeout and the connection closes."""
    async with serve(pipeline, tmp_path, read_timeout=0.5) as (_, url):
        started = time.monotonic()
        answer = await exchange(
            port_of(url), HEAD + b'Content-Length: 100\r\n\r\n{"text": "Hel', timeout=5
        )
        status, headers, body = parse(answer)
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        assert headers["connection"] == "close"
        assert time.monotonic() - started < 3
    assert pipeline.calls == []


# -- connection cap --------------------------------------------------------------------


async def test_full_listener_evicts_idle_connections_and_refuses_when_all_are_busy(
    pipeline: FakePipeline, tmp_path: Path
) -> None:
    """At max_connections a new client evicts the oldest idle one; with all busy it is closed."""
    async with (
        serve(pipeline, tmp_path, max_connections=4, read_timeout=30) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        port = port_of(url)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        for _, writer in idle:
            writer.write(HEAD)  # half-open: the head never ends
        await asyncio.sleep(0.2)
        async with session.post(url + "/v1/messages", json=MESSAGE) as resp:
            assert resp.status == 201
        assert await asyncio.wait_for(idle[0][0].read(), 2) == b""  # the oldest went

        pipeline.gate = asyncio.Event()
        posts = [
            asyncio.create_task(session.post(url + "/v1/messages", json=MESSAGE)) for _ in range(4)
        ]
        for _ in range(100):
            if len(pipeline.calls) == 5:
                break
            await asyncio.sleep(0.02)
        assert len(pipeline.calls) == 5  # four requests now wait inside the sink
        started = time.monotonic()
        try:
            refused = await exchange(port, HEAD + b"Content-Length: 2\r\n\r\n{}", timeout=2)
        except ConnectionResetError:
            refused = b""
        assert refused == b""  # closed at once, nothing read, nothing answered
        assert time.monotonic() - started < 1
        pipeline.gate.set()
        for task in posts:
            resp = await task
            assert resp.status == 201
            resp.release()
        for _, writer in idle:
            writer.close()


async def test_a_request_taken_but_not_yet_handled_is_not_idle(
    pipeline: FakePipeline, tmp_path: Path
) -> None:
    """A read request whose handler has not started yet is busy, not idle (eviction lost 201s).

    bench/reliability/flood.py --clients 1000 (over max_connections) stored about 1,000
    messages whose clients got a disconnect instead of their 201: the connection was
    evicted as idle in that window, and the handler still committed the message.
    """
    pipeline.gate = asyncio.Event()
    async with serve(pipeline, tmp_path) as (_, url):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        handler = None
        for _ in range(100):
            handlers = [o for o in gc.get_objects() if isinstance(o, _GuardedHandler)]
            if handlers and handlers[0].is_idle():
                handler = handlers[0]
                break
            await asyncio.sleep(0.01)
        assert handler is not None, "the connection never became idle"
        body = json.dumps(MESSAGE).encode()
        seen: list[bool] = []
        # The request arrives; the read loop takes it at the next loop step, and the
        # callback below runs right after that step, before the handler task's first.
        handler.data_received(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        asyncio.get_running_loop().call_soon(lambda: seen.append(handler.is_idle()))
        try:
            for _ in range(100):
                if pipeline.calls:
                    break
                await asyncio.sleep(0.01)
            assert pipeline.calls and seen == [False]
            assert not handler.is_idle()  # inside the sink
        finally:
            pipeline.gate.set()  # a failed check must not leave stop() waiting on the sink
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 201 "), head
        writer.close()


# -- malformed requests, encodings, hang-ups ---------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEAD + b"Authorization: Bearer SECRET-TOKEN-0123456789\x01\r\n\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nCUSTOMER-TEXT-my-parcel\r\n",
        b"GET /" + b"CUSTOMER-TEXT-" * 700 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CUSTOMER-TEXT / HTTP/1.1\r\n\r\n",
    ],
    ids=["header-char", "chunk", "long-line", "method"],
)
async def test_malformed_requests_get_json_400_without_echo_or_banner(
    pipeline: FakePipeline, tmp_path: Path, logs: io.StringIO, request_bytes: bytes
) -> None:
    """aiohttp's own 400s are JSON, without a version banner, and log no request bytes."""
    async with serve(pipeline, tmp_path) as (_, url):
        status, headers, body = parse(await exchange(port_of(url), request_bytes))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert headers["server"] == "omnirouter"
    assert body["error"]["code"] in ("bad_request", "line_too_long", "bad_method")
    for text in (json.dumps(body), logs.getvalue()):
        assert "SECRET-TOKEN" not in text and "CUSTOMER-TEXT" not in text
    assert [e for e in events(logs) if e["level"] == "error"] == []


async def test_compressed_body_is_415(pipeline: FakePipeline, tmp_path: Path) -> None:
    """Content-Encoding: gzip is refused with a JSON 415 (was: 500 and two tracebacks)."""
    async with serve(pipeline, tmp_path) as (_, url), aiohttp.ClientSession() as session:
        for data in (gzip.compress(json.dumps(MESSAGE).encode()), json.dumps(MESSAGE).encode()):
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            async with session.post(url + "/v1/messages", data=data, headers=headers) as resp:
                assert resp.status == 415
                assert resp.headers["Content-Type"] == "application/json"
                assert (await resp.json())["error"]["code"] == "unsupported_encoding"
    assert pipeline.calls == []


async def test_client_hanging_up_mid_body_is_a_debug_line(
    pipeline: FakePipeline, tmp_path: Path, logs: io.StringIO
) -> None:
    """A client gone before its body ends is logged at debug level, never as an internal error."""
    async with serve(pipeline, tmp_path) as (_, url):
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        writer.write(HEAD + b'Content-Length: 100\r\n\r\n{"text": "CUSTOMER-TEXT')
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.3)
    found = events(logs)
    assert [e for e in found if e["level"] in ("error", "critical", "warning")] == []
    assert any(e["event"] == "http.body_incomplete" for e in found)
    assert "CUSTOMER-TEXT" not in logs.getvalue()
    assert pipeline.calls == []


# -- the store cannot write ----------------------------------------------------------------


class SqlitePipeline(FakePipeline):
    """The fake pipeline, but each message is first written into a real SQLite file."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """Create the file; readonly opens it so that every write fails as on a read-only fs."""
        super().__init__()
        with sqlite3.connect(path) as setup:
            setup.execute("CREATE TABLE IF NOT EXISTS m (body BLOB)")
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self.conn = sqlite3.connect(uri, uri=True)
        self.writes = 0

    def fill(self) -> None:
        """Let the database grow no more (SQLITE_FULL), as a full disk would."""
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count = {pages}")

    def make_room(self) -> None:
        """Give the database room again."""
        self.conn.execute("PRAGMA max_page_count = 1000000")

    async def sink(self, message: InboundMessage) -> Any:
        """Write, commit, then hand the message on."""
        self.writes += 1
        with self.conn:
            self.conn.execute("INSERT INTO m VALUES (?)", (b"x" * 20_000,))
        return await super().sink(message)


@pytest.mark.parametrize("fault", ["full", "readonly"])
async def test_store_outage_is_a_cheap_503_logged_once_per_change(
    tmp_path: Path,
    logs: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Disk full or read-only: 503 Retry-After, the store tried once a probe interval, one line."""
    monkeypatch.setattr(channels.web, "STORE_PROBE_INTERVAL", 0.3)
    store = SqlitePipeline(tmp_path / "store.db", readonly=fault == "readonly")
    if fault == "full":
        store.fill()
    async with serve(store, tmp_path) as (channel, url), aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.post(url + "/v1/messages", json=MESSAGE) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "10"
                assert (await resp.json())["error"]["code"] == "unavailable"
        assert store.writes == 1  # the others were answered without touching the store
        assert channel.last_error.startswith("store unavailable")
        if fault == "full":
            store.make_room()
        else:
            store.conn = sqlite3.connect(tmp_path / "store.db")
        await asyncio.sleep(0.35)
        async with session.post(url + "/v1/messages", json=MESSAGE) as resp:
            assert resp.status == 201
        assert channel.last_error == ""
    found = events(logs)
    assert [e["event"] for e in found if e["level"] == "error"] == ["web.store_unavailable"]
    assert [e for e in found if "exception" in e] == []
    assert sum(e["event"] == "web.store_recovered" for e in found) == 1


# -- accept errors, secrets ------------------------------------------------------------------


async def test_accept_errors_are_reported_once_per_interval(logs: io.StringIO) -> None:
    """A storm of accept() failures is one line now and one line with the count later."""
    handler = AcceptErrorLog(interval=0.2)
    loop = asyncio.get_running_loop()
    context = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(errno.EMFILE, "Too many open files"),
    }
    for _ in range(1000):
        handler(loop, context)
    assert [(e["event"], e["EMFILE"]) for e in events(logs)] == [("http.accept_failed", 1)]
    await asyncio.sleep(0.3)
    assert [(e["event"], e["EMFILE"]) for e in events(logs)] == [
        ("http.accept_failed", 1),
        ("http.accept_failed", 999),
    ]


def test_generated_admin_token_is_masked_in_logs(tmp_path: Path, logs: io.StringIO) -> None:
    """The admin token written to <state_dir>/admin-token is registered for masking."""
    config_file = tmp_path / "omnirouter.toml"
    config_file.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    token = ensure_admin_token(load_config(config_file))
    assert mask_secrets(f"Bearer {token}") == "Bearer ***"
    clear_secrets()
    assert ensure_admin_token(load_config(config_file)) == token  # read back from the file
    assert mask_secrets(token) == "***"
