"""The code stays ruff-clean and mypy-clean (router, channels, adapters): CI checks it here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format() -> None:
    # ruff from the test extras, run by this interpreter (not whatever is on PATH):
    # a missing ruff fails here instead of skipping the check.
    assert importlib.util.find_spec("ruff"), "ruff is in the test extras: pip install -e '.[test]'"
    lint = _run(sys.executable, "-m", "ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_the_packages_are_mypy_clean() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
