"""The email channel's config model, through the real loader (paths, bounds, secrets)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from channels.email.config import EmailConfig
from router.config import ConfigError, load_config

EXAMPLE = Path(__file__).parent.parent / "config" / "omnirouter.example.toml"

GOOD = """
[[channels]]
type = "web"
name = "web"

[[channels]]
type = "email"
name = "support-mail"
[channels.imap]
host = "imap.example.com"
port = {port}
username = "support@example.com"
password = "${{TEST_IMAP_PASSWORD}}"
[channels.smtp]
host = "smtp.example.com"
from_address = "support@example.com"
username = "support@example.com"
password = "${{TEST_SMTP_PASSWORD}}"
"""


def write(tmp_path: Path, text: str) -> Path:
    """Write a config file."""
    path = tmp_path / "omnirouter.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_IMAP_PASSWORD", "imap-secret-value-1")
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "smtp-secret-value-2")


def test_a_valid_email_channel_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD.format(port=993)))
    email = config.channels[1]
    assert isinstance(email, EmailConfig)
    assert email.imap.password.get_secret_value() == "imap-secret-value-1"
    assert (email.imap.tls, email.imap.tls_verify, email.imap.effective_port) == (
        "implicit",
        True,
        993,
    )
    assert (email.smtp.tls, email.smtp.effective_port, email.smtp.domain) == (
        "starttls",
        587,
        "example.com",
    )
    assert not email.imap.mark_seen and email.imap.move_to is None
    assert email.imap.idle_renew <= 25 * 60
    assert set(email.ack.templates) == {"en", "zh"}


def test_error_names_the_nested_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.format(port=99999))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (error,) = info.value.errors
    assert "channels[1].imap.port" in error
    assert re.search(r"line \d+", error)
    assert "99999" in error


def test_secrets_are_not_echoed(tmp_path: Path) -> None:
    text = GOOD.format(port=993).replace('host = "imap.example.com"', 'host = "bad host!"')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "imap-secret-value-1" not in info.value.render()
    assert "channels[1].imap.host" in info.value.render()


def base(**imap: object) -> dict[str, object]:
    """Return a minimal valid config dict with imap overrides."""
    return {
        "type": "email",
        "name": "m",
        "imap": {"host": "imap.example.com", "username": "u", "password": "p", **imap},
        "smtp": {"host": "smtp.example.com", "from_address": "s@example.com"},
    }


@pytest.mark.parametrize(
    ("imap", "message"),
    [
        ({"tls": "none"}, "loopback"),
        ({"idle_renew": 3600}, "less than or equal to 1740"),
        ({"poll_interval": 0}, "greater than 0"),
        ({"folder": 'IN"BOX'}, "pattern"),
        ({"move_to": "INBOX"}, "move_to must differ"),
        ({"password": "a\r\nb"}, "control characters"),
        ({"reconnect_min": 10, "reconnect_max": 1}, "reconnect_min"),
    ],
)
def test_bounds_and_contradictions(imap: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EmailConfig.model_validate(base(**imap))


def test_plain_text_is_allowed_on_loopback() -> None:
    config = EmailConfig.model_validate(base(tls="none", host="127.0.0.1"))
    assert config.imap.effective_port == 143


def test_templates_may_use_only_known_fields() -> None:
    ok = base()
    ok["ack"] = {"templates": {"en": "Ticket {ticket} by {respond_by}"}}
    assert "{ticket}" in EmailConfig.model_validate(ok).ack.templates["en"]
    for bad in ("{ticket.__class__}", "{password}", "{0}", "{ticket!r}", "{"):
        cfg = base()
        cfg["ack"] = {"templates": {"en": bad}}
        with pytest.raises(ValidationError):
            EmailConfig.model_validate(cfg)
    zone = base()
    zone["ack"] = {"timezone": "Mars/Olympus"}
    with pytest.raises(ValidationError, match="time zone"):
        EmailConfig.model_validate(zone)


def test_smtp_from_name_and_credentials() -> None:
    cfg = base()
    cfg["smtp"] = {"host": "h", "from_address": "s@example.com", "from_name": "x\r\nBcc: y"}
    with pytest.raises(ValidationError, match="control characters"):
        EmailConfig.model_validate(cfg)
    cfg["smtp"] = {"host": "h", "from_address": "s@example.com", "username": "u"}
    with pytest.raises(ValidationError, match="go together"):
        EmailConfig.model_validate(cfg)


def test_the_commented_example_block_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    start = text.index('# type = "email"')
    end = text.index("# --- Adapters")
    lines = []
    for line in text[start:end].splitlines():
        if not line.startswith("# ") or line.startswith(("# imap =", "# smtp =", "# ack =")):
            continue
        body = line[2:]
        if re.match(r"^[a-z_]+ = |^\[channels\.", body):
            lines.append(body)
    toml = "[[channels]]\n" + "\n".join(lines).replace(
        "${OMNIROUTER_IMAP_PASSWORD}", "${TEST_IMAP_PASSWORD}"
    ).replace("${OMNIROUTER_SMTP_PASSWORD}", "${TEST_SMTP_PASSWORD}")
    config = load_config(write(tmp_path, toml))
    (email,) = config.channels
    assert email.imap.move_to == "Processed" and email.ack.timezone == "Asia/Shanghai"
