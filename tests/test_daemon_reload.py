"""A reload (SIGHUP) applies the daemon's logging settings, in process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from router import logging as rlog
from router.config import load_config
from router.daemon import Daemon
from router.logging import configure_logging, get_logger
from tests.daemon_harness import base_config, ports


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Log JSON lines into a StringIO; restore the logging defaults afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream, cache=False)
    yield stream
    if rlog._handler is not None:
        root.removeHandler(rlog._handler)
        rlog._handler = None
    root.setLevel(level)
    rlog.set_verbosity("info", log_bodies=False)
    structlog.reset_defaults()


async def test_reload_applies_log_level_and_log_bodies(
    tmp_path: Path, log_stream: io.StringIO
) -> None:
    web, ops = ports()
    path = tmp_path / "omnirouter.toml"
    original = base_config(tmp_path / "state", web_port=web, ops_port=ops)
    path.write_text(original)
    daemon = Daemon(load_config(path), path)
    probe = get_logger("tests.probe")
    await daemon.start()
    try:
        probe.info("probe.before", text="my order never came")
        changed = original.replace(
            "[daemon]\n", '[daemon]\nlog_level = "warning"\nlog_bodies = true\n'
        )
        assert changed != original
        path.write_text(changed)
        assert await daemon.reload()
        probe.info("probe.quiet", text="below the new level")
        probe.warning("probe.after", text="my order never came")
    finally:
        await daemon.stop()
    events = {e["event"]: e for e in map(json.loads, log_stream.getvalue().splitlines())}
    assert events["probe.before"]["text"] == "<redacted 19 chars>"
    assert "probe.quiet" not in events  # log_level = "warning" is in force
    assert events["probe.after"]["text"] == "my order never came"  # and log_bodies
    assert "config.reload_needs_restart" not in events
