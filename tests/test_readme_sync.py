"""README's command table and ops API table list exactly what the code has."""

from __future__ import annotations

import re

from router import cli
from router.ops import OpsApi
from tests.daemon_harness import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_every_command_is_in_the_readme_table_and_nothing_else() -> None:
    listed = set(re.findall(r"^\| `omnirouter ([a-z -]+)` \|", section("Commands"), re.M))
    code = {" ".join(path) for path, c in cli.COMMANDS.items() if c.handler is not None}
    assert listed == code, f"missing from README: {code - listed}; gone: {listed - code}"


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_ops_route_is_in_the_readme_table_and_nothing_else() -> None:
    app = OpsApi(
        health=None,  # type: ignore[arg-type]  (only the routes are read)
        metrics=None,  # type: ignore[arg-type]
        agents=None,  # type: ignore[arg-type]
        dead_letters=None,  # type: ignore[arg-type]
        corrections=None,  # type: ignore[arg-type]
        admin_token="x" * 24,
    ).app()
    code = {
        (r.method, _shape(r.resource.canonical))
        for r in app.router.routes()
        if r.method not in ("HEAD", "PUT") and r.resource is not None
    }
    rows = re.findall(r"^\| `(GET|POST) (/[^`? ]*)", section("Operations API"), re.M)
    listed = {(method, _shape(path)) for method, path in rows}
    assert listed == code, f"missing from README: {code - listed}; gone: {listed - code}"
