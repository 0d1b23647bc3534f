"""The README's systemd steps, run as written (paths moved under a temp root), then verified.

Every command of the README block runs in order, except `apt-get` (the machine has
python3-venv) and `systemctl`/`journalctl` (no systemd in the test). Two changes keep it
fast: the venv sees the installed dependencies (`--system-site-packages`) and pip
installs only the project (`--no-deps`; the build backend comes from the index). What is
checked: the venv's `omnirouter` is the unit's ExecStart, `config check --no-secrets` passes on
the installed example, and `systemd-analyze verify` accepts the unit as installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_harness import REPO
from tests.test_systemd_unit import UNIT_NAME, needs_systemd_analyze

README = REPO / "README.md"
UNIT = REPO / "systemd" / UNIT_NAME


def readme_steps() -> list[str]:
    """Return the commands of the README's systemd block, one per line."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Running under systemd") :]
    block = section[section.index("```sh\n") + 6 :]
    block = block[: block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_installs_what_the_unit_runs() -> None:
    steps = readme_steps()
    exec_start = re.search(r"^ExecStart=(\S+)", UNIT.read_text(), re.M)
    assert exec_start is not None
    binary = Path(exec_start.group(1))
    venv = binary.parent.parent
    assert f"python3 -m venv {venv}" in steps
    assert f"{venv}/bin/pip install ." in steps
    assert not str(venv).startswith(("/home", "/root"))  # ProtectHome=yes hides those
    assert any(s.startswith(f"{binary} config check --no-secrets ") for s in steps)
    assert re.search(r"^EnvironmentFile=-/etc/omnirouter/env$", UNIT.read_text(), re.M)
    assert "install -m 0600 /dev/null /etc/omnirouter/env" in steps


@needs_systemd_analyze
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_readme_steps_run_and_systemd_accepts_the_installed_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    moves = {
        "/opt/omnirouter": str(root / "opt/omnirouter"),
        "/etc/systemd/system/": str(root / "etc/systemd/system") + "/",
        "/etc/omnirouter": str(root / "etc/omnirouter"),
    }
    (root / "etc/systemd/system").mkdir(parents=True)

    def moved(line: str) -> str:
        for old, new in moves.items():
            line = line.replace(old, new)
        return line

    # A copy of the checkout, so the build leaves nothing in the repository.
    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", "tests", "bench", "build", "*.egg-info", ".*_cache", "__pycache__", "docs"
        ),
    )
    script = ["set -euo pipefail", f"cd {shlex.quote(str(checkout))}"]
    for step in readme_steps():
        if step.startswith(("apt-get ", "systemctl ", "journalctl ")):
            continue
        step = step.replace("python3 -m venv ", f"{sys.executable} -m venv --system-site-packages ")
        step = step.replace("/bin/pip install .", "/bin/pip install -q --no-deps .")
        script.append(moved(step))
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "not checked:" in result.stderr  # secrets listed
    installed = root / "etc/systemd/system" / UNIT_NAME
    env_file = root / "etc/omnirouter/env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    text = moved(installed.read_text()).replace(
        "EnvironmentFile=-/etc/omnirouter/env", f"EnvironmentFile=-{env_file}"
    )
    installed.write_text(text)
    assert f"ExecStart={root}/opt/omnirouter/bin/omnirouter run" in text
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(installed)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    ours = [line for line in verify.stderr.splitlines() if UNIT_NAME in line]
    assert verify.returncode == 0 and not ours, verify.stderr
