"""Checks for the shipped systemd unit, systemd/omnirouter.service.

`systemd-analyze verify` must accept the unit without warnings about it, and
`systemd-analyze security --offline=true` must rate its exposure 2.0 or lower.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_NAME = "omnirouter.service"
UNIT_PATH = Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME
MAX_EXPOSURE = 2.0  # issue 13: at most 2.0 (the unit rates 1.1 today; keep it)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (Debian package: systemd)"
)

EXEC_START_RE = re.compile(r"^(ExecStart=)(\S+)", re.MULTILINE)
EXPOSURE_RE = re.compile(rf"Overall exposure level for {re.escape(UNIT_NAME)}:\s*(\d+(?:\.\d+)?)")


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def _unit_text() -> str:
    return UNIT_PATH.read_text(encoding="utf-8")


def _directives(text: str) -> dict[str, list[str]]:
    """Map each directive name to its values, in order, ignoring comments."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def _verifiable_copy(tmp_path: Path) -> Path:
    """Copy the unit, pointing ExecStart at an executable present on this machine.

    `verify` insists that the ExecStart binary exists; /usr/local/bin/omnirouter
    usually does not on a development box. Only the path is rewritten; the file
    keeps its name so that messages about it still name omnirouter.service.
    """
    binary = shutil.which("omnirouter") or "/bin/true"
    text, count = EXEC_START_RE.subn(lambda m: m.group(1) + binary, _unit_text())
    assert count == 1, "expected exactly one ExecStart= line in the unit"
    copy = tmp_path / UNIT_NAME
    copy.write_text(text, encoding="utf-8")
    return copy


@needs_systemd_analyze
def test_verify_accepts_unit_without_warnings(tmp_path: Path) -> None:
    unit = _verifiable_copy(tmp_path)
    result = _analyze("verify", str(unit), cwd=tmp_path)
    # verify also reports on unrelated system units it loads (masked units,
    # other services' missing binaries, ...); only lines about our file count.
    ours = [
        line for line in result.stderr.splitlines() if UNIT_NAME in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, f"verify failed ({result.returncode}):\n{result.stderr}"
    assert not ours, "verify warned about the unit:\n" + "\n".join(ours)


@needs_systemd_analyze
def test_security_exposure_is_low() -> None:
    result = _analyze("security", "--offline=true", "--no-pager", str(UNIT_PATH))
    output = result.stdout + result.stderr
    match = EXPOSURE_RE.search(output)
    assert match is not None, f"no exposure level in output ({result.returncode}):\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_unit_has_required_directives() -> None:
    directives = _directives(_unit_text())

    def single(key: str) -> str:
        values = directives.get(key, [])
        assert len(values) == 1, f"expected exactly one {key}=, found {values}"
        return values[0]

    assert single("Type") == "notify"
    assert single("NotifyAccess") == "main"
    assert single("WatchdogSec") == "30"
    assert single("Restart") == "on-failure"
    assert single("RestartPreventExitStatus").split() == ["11"]
    assert single("ExecStart").split()[1:] == [
        "run",
        "--config",
        "/etc/omnirouter/omnirouter.toml",
    ]
    assert single("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert single("KillMode") == "mixed"
    assert single("StateDirectory") == "omnirouter"
    assert "OMNIROUTER_STATE_DIR=%S/omnirouter" in directives.get("Environment", [])
    assert single("ConfigurationDirectory") == "omnirouter"
    assert directives.get("DynamicUser") == ["yes"] or directives.get("User"), (
        "the service must not run as root: set DynamicUser=yes or User="
    )
    # Room above every listener's default connection cap (web 512 + ops 32), which the
    # 1,024 default left too little of (issue 13: idle clients took the listeners down).
    assert int(single("LimitNOFILE")) >= 4096
    # The daemon reaches brokers and webhooks; a blanket deny would cut it off.
    assert "any" not in " ".join(directives.get("IPAddressDeny", [])).split()
