"""Admin commands find the running daemon's state, never create one, and say where they looked.

Also: `config check --no-secrets` on a config whose secrets live elsewhere, and store-only
commands that do not need channel secrets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from router import cli
from router.store.sqlite import SqliteStore
from tests.daemon_harness import REPO

EXAMPLE = REPO / "config" / "omnirouter.example.toml"
TOKEN = "cli-state-test-token-0123456789"


def make_state(state: Path) -> None:
    """Create a daemon's state as `omnirouter run` leaves it: the store and the token."""

    async def create() -> None:
        store = SqliteStore(state / "omnirouter.db")
        await store.open()
        await store.close()

    asyncio.run(create())
    (state / "admin-token").write_text(TOKEN + "\n")


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, no state variables set."""
    cwd = tmp_path / "somewhere-else"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("OMNIROUTER_STATE_DIR", raising=False)
    monkeypatch.delenv("OMNIROUTER_ADMIN_TOKEN", raising=False)
    return cwd


def test_store_commands_elsewhere_create_nothing_and_say_where_they_looked(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["dead-letters", "list"],
        ["explain", "01JNOSUCHMESSAGE"],
        ["ticket", "history", "T-01JNOSUCH"],
        ["agents"],
        ["contacts", "find", "ann"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 1, argv
        err = capsys.readouterr().err
        assert "nothing was created" in err and "--state-dir" in err, (argv, err)
    assert list(elsewhere.iterdir()) == []  # no ./omnirouter-state, no token, no store


def test_state_dir_flag_and_environment_find_the_store(
    elsewhere: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "var-lib-omnirouter"
    state.mkdir()
    make_state(state)
    assert cli.main(["dead-letters", "list", "--state-dir", str(state)]) == 0
    assert "no dead letters" in capsys.readouterr().out
    monkeypatch.setenv("OMNIROUTER_STATE_DIR", str(state))
    assert cli.main(["dead-letters", "list", "--json"]) == 0
    assert list(elsewhere.iterdir()) == []


def test_store_commands_do_not_need_the_channels_secrets(
    elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    make_state(state)
    conf = tmp_path / "prod.toml"
    conf.write_text(
        f'[daemon]\nstate_dir = "{state}"\n\n'
        '[[adapters]]\ntype = "webhook"\nname = "crm"\nurl = "https://crm.example.com/hook"\n'
        'secret = "${CRM_WEBHOOK_SECRET_NOT_SET}"\n\n'
        '[[agents]]\nid = "alice"\ncapacity = 2\ntool = "crm"\n'
    )
    monkeypatch.delenv("CRM_WEBHOOK_SECRET_NOT_SET", raising=False)
    assert cli.main(["dead-letters", "list", "-c", str(conf)]) == 0
    # Running the daemon still needs it, and says which one.
    with pytest.raises(SystemExit) as exc:
        cli._load(str(conf))
    assert exc.value.code == cli.EXIT_BAD_CONFIG


def test_config_check_without_the_secrets_checks_the_rest_and_lists_what_it_skipped(
    elsewhere: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OMNIROUTER_IMAP_PASSWORD", "OMNIROUTER_MQTT_PASSWORD", "CRM_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["config", "check", str(EXAMPLE)])
    assert exc.value.code == cli.EXIT_BAD_CONFIG
    assert "is not set" in capsys.readouterr().err
    assert cli.main(["config", "check", "--no-secrets", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    skipped = [line for line in err.splitlines() if line.startswith("not checked:")]
    assert skipped and all("secret not available here" in line for line in skipped)
    assert any("${OMNIROUTER_MQTT_PASSWORD}" in line for line in skipped)
    # Everything else is still checked: a bad port is an error with or without secrets.
    broken = elsewhere / "broken.toml"
    broken.write_text(EXAMPLE.read_text().replace("port = 1883", "port = 99999", 1))
    with pytest.raises(SystemExit) as exc:
        cli.main(["config", "check", "--no-secrets", str(broken)])
    assert exc.value.code == cli.EXIT_BAD_CONFIG
    assert "99999" in capsys.readouterr().err


@pytest.fixture
async def refusing_ops() -> AsyncIterator[str]:
    """An ops API that takes only TOKEN."""

    async def agents(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        return web.json_response({"agents": []})

    app = web.Application()
    app.router.add_get("/v1/agents", agents)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_refused_token_is_named_with_where_it_came_from(
    elsewhere: Path, tmp_path: Path, refusing_ops: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "old-state"
    state.mkdir()
    (state / "admin-token").write_text("some-other-daemons-token-000000\n")

    def run(*argv: str) -> int:
        return cli.main(["agents", "--ops-url", refusing_ops, *argv])

    code = await asyncio.to_thread(run, "--state-dir", str(state))
    assert code == 1
    err = capsys.readouterr().err
    assert "refused the admin token from" in err and str(state / "admin-token") in err
    assert await asyncio.to_thread(run, "--token", TOKEN) == 0
