"""Structured logging: JSON shape, redaction, secret masking, levels, stdlib routing."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from router import logging as rlog
from router.daemon import Notifier
from router.logging import clear_secrets, configure_logging, get_logger, register_secret

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


class FakeTTY(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        """Pretend to be a terminal."""
        return True


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Start each test without registered secrets or context; restore stdlib afterwards."""
    clear_secrets()
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    level = root.level
    yield
    clear_secrets()
    structlog.contextvars.clear_contextvars()
    if rlog._handler is not None:
        root.removeHandler(rlog._handler)
        rlog._handler = None
    root.setLevel(level)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Parse every line of stream as one JSON object."""
    text = stream.getvalue()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


def configured(level: str = "info", **kwargs: Any) -> io.StringIO:
    """Configure logging into a fresh StringIO and return it."""
    stream = io.StringIO()
    configure_logging(level, stream=stream, **kwargs)
    return stream


def test_json_shape_one_object_per_line() -> None:
    stream = configured()
    log = get_logger("router.pipeline", component="test")
    log.info("message_routed", msg_id="01J9", queue="default", wait_ms=12.5)
    log.warning("second", count=2)
    first, second = lines(stream)
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["level"] == "info"
    assert first["event"] == "message_routed"
    assert first["logger"] == "router.pipeline"
    assert ISO_UTC.match(first["timestamp"]), first["timestamp"]
    assert (first["component"], first["msg_id"], first["queue"], first["wait_ms"]) == (
        "test",
        "01J9",
        "default",
        12.5,
    )
    assert second["level"] == "warning" and second["count"] == 2


def test_plain_structlog_loggers_and_contextvars() -> None:
    stream = configured()
    structlog.contextvars.bind_contextvars(channel="web", msg_id="01JX")
    structlog.get_logger().info("hello", odd=object.__name__)
    (record,) = lines(stream)
    assert record["logger"] == "omnirouter"
    assert (record["channel"], record["msg_id"]) == ("web", "01JX")


@pytest.mark.parametrize("serializer", ["orjson", "stdlib"])
def test_non_json_values_are_serialised(serializer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each serializer explicitly: which one is the default depends on whether orjson is
    # installed (it is in the test extras, so a missing one fails here, not skips).
    dumps = {"orjson": getattr(rlog, "_orjson_dumps", None), "stdlib": rlog._stdlib_dumps}
    assert dumps[serializer] is not None, "orjson is in the test extras: install them"
    monkeypatch.setattr(rlog, "_dumps", dumps[serializer])
    stream = configured()
    get_logger("x").info(
        "values",
        when=datetime(2024, 1, 2, tzinfo=UTC),
        path=Path("/tmp/a"),
        text_like="中文",
        codes={1: "one"},
    )
    (record,) = lines(stream)
    assert record["when"] == "2024-01-02T00:00:00+00:00"
    assert record["path"] == "/tmp/a"
    assert record["text_like"] == "中文"
    assert record["codes"] == {"1": "one"}
    assert "中文" in stream.getvalue()  # UTF-8, not \u escapes


@pytest.mark.parametrize(
    "key",
    [
        "secret",
        "webhook_secret",
        "token",
        "admin_token",
        "status_token",
        "password",
        "Authorization",
        "api_key",
        "apikey",
        "signature",
    ],
)
def test_secret_keys_are_masked(key: str) -> None:
    stream = configured()
    get_logger("x").info("event", **{key: "hunter2-value"})
    (record,) = lines(stream)
    assert record[key] == "***"
    assert "hunter2-value" not in stream.getvalue()


def test_secret_keys_inside_nested_values_are_masked() -> None:
    stream = configured()
    get_logger("x").info(
        "request", headers={"Authorization": "Bearer abc", "Accept": "json"}, items=[{"token": "t"}]
    )
    (record,) = lines(stream)
    assert record["headers"] == {"Authorization": "***", "Accept": "json"}
    assert record["items"] == [{"token": "***"}]


@pytest.mark.parametrize("key", ["text", "body", "subject", "raw"])
def test_bodies_are_replaced_by_their_size(key: str) -> None:
    stream = configured()
    get_logger("x").info("message", **{key: "My order 12345 never arrived"})
    (record,) = lines(stream)
    assert record[key] == "<redacted 28 chars>"
    assert "12345" not in stream.getvalue()


def test_bytes_bodies_and_none() -> None:
    stream = configured()
    get_logger("x").info("message", raw=b"\x00\x01\x02", body=None, text=["a"])
    (record,) = lines(stream)
    assert record["raw"] == "<redacted 3 bytes>"
    assert record["body"] is None
    assert record["text"] == "<redacted>"


def test_log_bodies_opt_in() -> None:
    stream = configured(log_bodies=True)
    get_logger("x").info("message", text="hello there", subject="hi", token="still-secret")
    (record,) = lines(stream)
    assert (record["text"], record["subject"]) == ("hello there", "hi")
    assert record["token"] == "***"  # credentials stay masked even when debugging bodies


def test_registered_secret_is_masked_inside_other_values() -> None:
    stream = configured(log_bodies=True)
    register_secret("s3cr3t-webhook-key")
    log = get_logger("x")
    log.info(
        "connect failed: url=https://h/?k=s3cr3t-webhook-key",
        detail="auth s3cr3t-webhook-key refused",
        text="customer pasted s3cr3t-webhook-key",
        nested={"why": ["x s3cr3t-webhook-key"]},
    )
    (record,) = lines(stream)
    assert record["event"] == "connect failed: url=https://h/?k=***"
    assert record["detail"] == "auth *** refused"
    assert record["text"] == "customer pasted ***"
    assert record["nested"] == {"why": ["x ***"]}


def test_short_secrets_are_not_used_for_substring_masking() -> None:
    stream = configured()
    register_secret("abc")  # would garble every line containing "abc"
    get_logger("x").info("abcdef")
    assert lines(stream)[0]["event"] == "abcdef"


def test_longer_overlapping_secret_is_masked_whole() -> None:
    stream = configured()
    register_secret("prefix-secret")
    register_secret("prefix-secret-longer")
    get_logger("x").info("v=prefix-secret-longer")
    assert lines(stream)[0]["event"] == "v=***"


def test_config_loading_registers_resolved_secrets(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.config import load_config

    monkeypatch.setenv("LOG_TEST_TOKEN", "env-admin-token-0123456789")
    path = tmp_path / "o.toml"
    path.write_text('[ops]\nadmin_token = "${LOG_TEST_TOKEN}"\n', encoding="utf-8")
    load_config(path)
    stream = configured()
    get_logger("x").info("oops", note="token is env-admin-token-0123456789")
    assert lines(stream)[0]["note"] == "token is ***"


def test_level_filtering() -> None:
    stream = configured("warning")
    log = get_logger("x")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert [r["event"] for r in lines(stream)] == ["w", "e", "c"]


def test_reconfiguring_reaches_cached_loggers() -> None:
    first = configured("info")
    log = get_logger("x")
    log.debug("hidden")
    log.info("shown")  # the logger is now cached
    second = configured("debug")
    log.debug("now shown")
    assert [r["event"] for r in lines(first)] == ["shown"]
    assert [r["event"] for r in lines(second)] == ["now shown"]


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", stream=io.StringIO())


def test_exception_is_a_string_field() -> None:
    stream = configured()
    register_secret("password-in-exception")
    try:
        raise RuntimeError("login failed with password-in-exception")
    except RuntimeError:
        get_logger("x").exception("delivery_failed", target="crm")
    (record,) = lines(stream)
    assert record["level"] == "error"
    assert isinstance(record["exception"], str)
    assert "Traceback (most recent call last)" in record["exception"]
    assert "RuntimeError: login failed with ***" in record["exception"]
    assert "password-in-exception" not in stream.getvalue()


def test_exc_info_argument() -> None:
    stream = configured()
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError as exc:
        get_logger("x").warning("lookup", exc_info=exc)
    (record,) = lines(stream)
    assert "KeyError: 'missing'" in record["exception"]
    assert "exc_info" not in record


def test_stdlib_logging_goes_through_the_same_pipeline() -> None:
    stream = configured("info")
    register_secret("broker-password-123")
    lib = logging.getLogger("aiomqtt.test")
    lib.info("chatty details")  # below WARNING: third-party noise stays out
    lib.warning("reconnecting with %s", "broker-password-123")
    try:
        raise OSError("connection reset")
    except OSError:
        lib.exception("socket error")
    records = lines(stream)
    assert [r["event"] for r in records] == ["reconnecting with ***", "socket error"]
    assert records[0]["logger"] == "aiomqtt.test"
    assert records[0]["level"] == "warning"
    assert ISO_UTC.match(records[0]["timestamp"])
    assert "OSError: connection reset" in records[1]["exception"]
    assert records[1]["level"] == "error"


def test_stdlib_handler_is_replaced_not_stacked() -> None:
    configured()
    stream = configured()
    logging.getLogger("aiohttp.test").warning("once")
    assert [r["event"] for r in lines(stream)] == ["once"]


def test_console_renderer_on_a_tty() -> None:
    stream = FakeTTY()
    configure_logging("info", stream=stream)
    register_secret("console-secret-xyz")
    get_logger("router.test").info("routed", queue="default", text="body here", token="t")
    out = stream.getvalue()
    assert not out.startswith("{")
    assert "routed" in out and "router.test" in out
    assert "body here" not in out and "<redacted 9 chars>" in out
    try:
        raise ValueError("console-secret-xyz leaked?")
    except ValueError:
        get_logger("x").exception("failed")
    assert "console-secret-xyz" not in stream.getvalue()
    assert "ValueError: *** leaked?" in stream.getvalue()


def test_json_forced_on_a_tty_and_console_forced_off_one() -> None:
    tty = FakeTTY()
    configure_logging("info", stream=tty, json=True)
    get_logger("x").info("as json")
    assert json.loads(tty.getvalue())["event"] == "as json"
    plain = io.StringIO()
    configure_logging("info", stream=plain, json=False)
    get_logger("x").info("pretty")
    assert not plain.getvalue().startswith("{") and "pretty" in plain.getvalue()
    assert "\x1b[" not in plain.getvalue()  # no colours when not a terminal


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """Configure logging into a real file (an OS stream, as journald's pipe is)."""
    path = tmp_path / "daemon.log"
    with path.open("w") as stream:  # block-buffered: nothing reaches the file unflushed
        configure_logging("info", stream=stream, cache=False)
        yield path
        configure_logging("info", stream=io.StringIO(), cache=False)


def events_in(path: Path) -> list[str]:
    """Return the events of the lines that reached the file."""
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


async def test_lines_logged_in_the_loop_are_written_by_the_end_of_its_iteration(
    log_file: Path,
) -> None:
    get_logger("router.test").info("first.event")
    get_logger("router.test").info("second.event")
    assert events_in(log_file) == []  # deferred: one write(2) for the iteration's lines
    await asyncio.sleep(0)
    assert events_in(log_file) == ["first.event", "second.event"]


async def test_a_service_manager_notice_finds_the_lines_logged_before_it(
    log_file: Path, tmp_path: Path
) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    notifier = Notifier(str(tmp_path / "notify.sock"))
    try:
        get_logger("router.daemon").info("daemon.ready")
        notifier.send(READY=1)
        # No await in between: the loop has not flushed, the notifier did.
        assert manager.recv(4096) == b"READY=1"
        assert events_in(log_file) == ["daemon.ready"]
    finally:
        notifier.close()
        manager.close()
