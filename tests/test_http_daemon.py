"""The real daemon under attack over HTTP, as issue 13 found it: each test failed before.

A flood of half-open requests at a 1,024-descriptor limit, malformed requests that
carried tokens and customer text into the log, and a second instance on a busy port.
"""

from __future__ import annotations

import gzip
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import DaemonProcess, base_config, http, ports

MESSAGE = {"text": "My parcel has not arrived", "contact": {"handle": "alice@example.com"}}
CUSTOMER_TEXT = "CUSTOMER-TEXT-my-card-number-is-4111"
HALF_OPEN = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Collect started daemons and make sure each is gone after the test."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.close()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a new connection and return everything read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    """Split a raw HTTP answer into status, headers (lower-case names) and JSON body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)


def _limit_descriptors() -> None:
    """Give the daemon the 1,024 descriptors systemd gives a unit without LimitNOFILE."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_half_open_flood_at_1024_descriptors_leaves_health_and_posts_answering(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """1,100 half-open requests on the web port and 100 on the ops port, default limits.

    Before: the flood used every descriptor, /healthz and POST stopped answering and
    asyncio logged a traceback per failed accept.
    """
    web_port, ops_port = ports()
    config = base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
    daemon = DaemonProcess(tmp_path, config, preexec_fn=_limit_descriptors)
    daemons.append(daemon)
    daemon.start()
    held: list[socket.socket] = []
    try:
        for port, count in ((web_port, 1100), (ops_port, 100)):
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(HALF_OPEN)
                held.append(sock)
        time.sleep(0.5)  # let the daemon accept what the kernel queued

        started = time.monotonic()
        status, body, _ = http("GET", f"http://127.0.0.1:{ops_port}/healthz", timeout=5)
        assert (status, body["status"]) == (200, "ok")
        status, body, _ = http("POST", f"http://127.0.0.1:{web_port}/v1/messages", MESSAGE)
        assert status == 201, body
        assert time.monotonic() - started < 5
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        for sock in held:
            sock.close()
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert "out of system resource" not in log
    assert len(daemon.log_events("http.accept_failed")) <= 2
    overloads = daemon.log_events("http.overloaded")
    assert 1 <= len(overloads) <= 4  # one line per listener per 10 s, with counts
    assert {e["listener"] for e in overloads} == {"web:web", "ops"}


def test_malformed_requests_answer_json_and_leak_nothing_to_the_log(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Broken requests carrying the generated admin token, a status token and customer text.

    Before: aiohttp answered text/plain with a `Server: Python/… aiohttp/…` banner and
    logged the raw header and body bytes at ERROR.
    """
    web_port, ops_port = ports()
    config = base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
    config = config.replace('admin_token = "test-admin-token-0123456789"\n', "")
    config = config.replace("[daemon]\n", '[daemon]\nlog_level = "debug"\n')
    daemon = DaemonProcess(tmp_path, config)
    daemons.append(daemon)
    daemon.start()
    admin = (tmp_path / "state" / "admin-token").read_text().strip()
    status, created, _ = http(
        "POST", f"http://127.0.0.1:{web_port}/v1/messages", {**MESSAGE, "text": CUSTOMER_TEXT}
    )
    assert status == 201, created
    status_token = created["status_token"]
    text = CUSTOMER_TEXT.encode()
    body = json.dumps({**MESSAGE, "text": CUSTOMER_TEXT}).encode()
    bad_header = b"Authorization: Bearer %s\x01\r\n"
    cases = [
        (web_port, HALF_OPEN + bad_header % admin.encode() + b"\r\n", 400),
        (ops_port, b"GET /v1/agents HTTP/1.1\r\n" + bad_header % admin.encode() + b"\r\n", 400),
        (
            web_port,
            b"GET /v1/tickets/%s HTTP/1.1\r\n" % created["ticket"].encode()
            + bad_header % status_token.encode()
            + b"\r\n",
            400,
        ),
        (web_port, HALF_OPEN + b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + text + b"\r\n", 400),
        (web_port, b"GET /" + text * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (web_port, HALF_OPEN + b"X-Note: " + text + b"\x7f\r\n\r\n", 400),
        (
            web_port,
            HALF_OPEN
            + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzip.compress(body))
            + gzip.compress(body),
            415,
        ),
        (ops_port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
        (ops_port, b"POST /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (ops_port, b"GET /v1/agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 401),
    ]
    for port, request, expected in cases:
        answer = raw(port, request)
        status, headers, error = parse(answer)
        assert status == expected, answer[:200]
        assert headers["content-type"].startswith("application/json"), answer[:200]
        assert headers["server"] == "omnirouter", answer[:200]
        assert set(error["error"]) >= {"code", "message"}
    # A client hanging up in the middle of its body.
    with socket.create_connection(("127.0.0.1", web_port), timeout=5) as sock:
        sock.sendall(HALF_OPEN + b"Content-Length: %d\r\n\r\n" % len(body) + body[:40])
        time.sleep(0.2)
    time.sleep(0.3)
    assert daemon.stop() == 0
    log = daemon.log_text()
    for secret in (admin, status_token, CUSTOMER_TEXT, "CUSTOMER-TEXT"):
        assert secret not in log
    assert "aiohttp.server" not in log and "Traceback" not in log
    assert [e for e in daemon.log_events() if e.get("level") == "error"] == []
    assert daemon.log_events("http.bad_request")  # logged, at debug level, by class only


def test_second_daemon_on_a_busy_port_exits_1_without_ready(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """A web port already taken fails the start at once: exit 1, no READY=1, a clear line.

    Before: the channel was retried for ever and READY=1 was sent after 10 s.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        web_port = holder.getsockname()[1]
        _, ops_port = ports()
        config = base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
        daemon = DaemonProcess(tmp_path, config)
        daemons.append(daemon)
        started = time.monotonic()
        daemon.start(wait_ready=False)
        assert daemon.wait(timeout=15) == 1
        assert time.monotonic() - started < 8
    assert not any("READY" in n for n in daemon.notifications)
    failed = daemon.log_events("daemon.start_failed")
    assert len(failed) == 1
    assert f"cannot listen on 127.0.0.1:{web_port}" in failed[0]["error"]
    # One line for the operator, no traceback: a busy port is not a bug.
    assert "exception" not in failed[0]
    text = daemon.log_text()
    assert "Traceback" not in text
    assert "omnirouter: cannot start: " in text and "is another omnirouter running?" in text
