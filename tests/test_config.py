"""Config loading: defaults, the example file, every error class, secrets, includes."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from router import logging as rlog
from router.config import (
    AgentConfig,
    ClassifierConfig,
    Config,
    ConfigError,
    DaemonConfig,
    OpsConfig,
    OutboxConfig,
    OverflowStepConfig,
    RoutingConfig,
    RoutingRule,
    SchedulingConfig,
    SeverityRule,
    ShiftConfig,
    SlaConfig,
    StoreConfig,
    load_config,
    loads_config,
    redacted_dump,
)
from router.crisis import CrisisConfig
from router.drivers import ADAPTERS, CHANNELS, load_driver

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "omnirouter.example.toml"
EXAMPLE_ENV = {
    "OMNIROUTER_ADMIN_TOKEN": "admin-token-0123456789abcdef",
    "OMNIROUTER_MQTT_PASSWORD": "mqtt-password-s3cr3t",
    "OMNIROUTER_WEBHOOK_SECRET": "webhook-hmac-key-s3cr3t",
}
# The smallest useful config: one adapter, one agent using it.
BASE = """
[[adapters]]
type = "inbox"
name = "inbox"

[[agents]]
id = "alice"
tool = "inbox"
"""


@pytest.fixture(autouse=True)
def _no_registered_secrets() -> Iterator[None]:
    """Keep secrets registered by one test's config from masking another's logs."""
    rlog.clear_secrets()
    yield
    rlog.clear_secrets()


def write(directory: Path, text: str, name: str = "omnirouter.toml") -> Path:
    """Write a dedented TOML file and return its path."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    """Load path, expect a ConfigError and return its rendered lines."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == info.value.render() == "\n".join(info.value.errors)
    return info.value.errors


def set_example_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the variables the example file references."""
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)


# -- loading what we ship -----------------------------------------------------------


def test_embedded_defaults_load() -> None:
    config = load_config(None)
    assert config.source == "<embedded defaults>"
    assert [(c.type, c.name, c.port) for c in config.channels] == [("web", "web", 8080)]
    assert [(a.type, a.name) for a in config.adapters] == [("inbox", "inbox")]
    assert [a.id for a in config.agents] == ["alice", "bo", "chen"]
    assert config.ops.admin_token is None


def test_example_loads_with_its_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    set_example_env(monkeypatch)
    config = load_config(EXAMPLE)
    assert [c.type for c in config.channels] == ["web"]
    assert sorted(a.type for a in config.adapters) == ["inbox", "mqtt", "webhook"]
    tools = {a.name: a.type for a in config.adapters}
    # Every adapter is used by some agent, and every agent names a configured adapter.
    assert {tools[agent.tool] for agent in config.agents} == {"inbox", "mqtt", "webhook"}
    assert config.ops.admin_token == EXAMPLE_ENV["OMNIROUTER_ADMIN_TOKEN"]
    mqtt = next(a for a in config.adapters if a.type == "mqtt")
    assert mqtt.password.get_secret_value() == EXAMPLE_ENV["OMNIROUTER_MQTT_PASSWORD"]
    assert (mqtt.topic_prefix, mqtt.qos, mqtt.port) == ("omnirouter/agents", 1, 1883)
    webhook = next(a for a in config.adapters if a.type == "webhook")
    assert webhook.secret.get_secret_value() == EXAMPLE_ENV["OMNIROUTER_WEBHOOK_SECRET"]
    assert config.queue_for("complaint", "P2") == "complaints"
    assert config.queue_for("inquiry", "P0") == "supervisors"


def test_example_has_no_placeholders_and_documents_every_option() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    settings = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "CHANGE_ME" not in settings and "changeme" not in settings.lower()
    for section in ("daemon", "store", "ops", "classifier", "sla", "routing", "outbox"):
        assert f"\n[{section}]\n" in text
    models: list[type[BaseModel]] = [
        DaemonConfig,
        StoreConfig,
        OpsConfig,
        ClassifierConfig,
        CrisisConfig,
        SeverityRule,
        SlaConfig,
        RoutingConfig,
        OutboxConfig,
        AgentConfig,
        ShiftConfig,
        SchedulingConfig,
        OverflowStepConfig,
        RoutingRule,
    ]
    for registry in (CHANNELS, ADAPTERS):
        models.extend(load_driver(registry, name).config_model for name in registry)
    assert "\n[classifier.crisis]\n" in text
    assert "\n[[classifier.severity_rules]]\n" in text
    assert "\n[[scheduling.overflow]]\n" in text
    assert "\n[[agents.shifts]]\n" in text
    assert "\n[[routing.rules]]\n" in text
    for model in models:
        for field in model.model_fields:
            if field in ("crisis", "severity_rules", "overflow", "shifts", "rules"):
                continue  # tables of their own, checked through their models
            # Written as a setting or, for optional ones, as a commented-out example.
            assert re.search(rf"^#? ?{field} = ", text, re.MULTILINE), (
                f"{model.__module__}.{model.__name__}.{field} is not documented in the example"
            )


def test_example_without_env_names_each_variable_and_line() -> None:
    errors = errors_of(EXAMPLE)
    assert len(errors) == 3  # no follow-on "too short" errors after a missing variable
    joined = "\n".join(errors)
    for name, path in [
        ("OMNIROUTER_ADMIN_TOKEN", "ops.admin_token"),
        ("OMNIROUTER_MQTT_PASSWORD", "adapters[1].password"),
        ("OMNIROUTER_WEBHOOK_SECRET", "adapters[2].secret"),
    ]:
        assert f": {path}: environment variable {name} is not set" in joined
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    first = errors[0]
    assert first.startswith(f"{EXAMPLE} line ")
    line_no = int(first.split(" line ")[1].split(":")[0])
    assert lines[line_no - 1].startswith("admin_token =")


def test_redacted_dump_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    set_example_env(monkeypatch)
    dump = redacted_dump(load_config(EXAMPLE))
    text = json.dumps(dump)  # plain JSON data
    for value in EXAMPLE_ENV.values():
        assert value not in text
    assert dump["ops"]["admin_token"] == "***"
    by_name = {a["name"]: a for a in dump["adapters"]}
    assert by_name["desk"]["password"] == "***"
    assert by_name["desk"]["username"] == "router"
    assert by_name["crm"]["secret"] == "***"
    assert dump["channels"][0]["port"] == 8080


def test_redacted_dump_masks_env_values_in_ordinary_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_PATH", "T000/B000/abcdefsecretpath")
    monkeypatch.setenv("CRM_TOKEN", "crm-token-value-123")
    path = write(
        tmp_path,
        """
        [[adapters]]
        type = "webhook"
        name = "slack"
        url = "https://hooks.example.com/services/${HOOK_PATH}"
        secret = "${CRM_TOKEN}"
        headers = { Authorization = "Bearer ${CRM_TOKEN}" }
        """,
    )
    dump = redacted_dump(load_config(path))
    assert dump["adapters"][0]["url"] == "https://hooks.example.com/services/***"
    assert dump["adapters"][0]["headers"] == {"Authorization": "***"}
    assert "crm-token-value-123" not in json.dumps(dump)


# -- each error class names file, line and path ---------------------------------------


def test_out_of_range_port_names_file_line_path_and_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[channels]]
        type = "web"
        name = "web"
        port = 99999
        """,
    )
    assert errors_of(path) == [
        f"{path} line 4: channels[0].port: Input should be less than or equal to 65535 (got 99999)"
    ]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "ops.example.com"])
def test_public_ops_host_needs_an_explicit_opt_in(tmp_path: Path, host: str) -> None:
    """A non-loopback ops.host is refused (it was accepted silently) unless allow_public."""
    path = write(tmp_path, f'[ops]\nhost = "{host}"\n')
    [error] = errors_of(path)
    assert error.startswith(f"{path} line 2: ops.host: {host!r} is not a loopback address")
    assert "ops.allow_public = true" in error
    path.write_text(f'[ops]\nhost = "{host}"\nallow_public = true\n', encoding="utf-8")
    assert load_config(path).ops.host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_ops_host_needs_no_opt_in(tmp_path: Path, host: str) -> None:
    """Loopback addresses are fine as they are."""
    assert load_config(write(tmp_path, f'[ops]\nhost = "{host}"\n')).ops.host == host


def test_unknown_key_is_rejected_with_its_path_and_a_suggestion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[channels]]
        type = "web"
        name = "web"
        prot = 8080
        """,
    )
    assert errors_of(path) == [
        f"{path} line 4: channels[0].prot: unknown setting; did you mean 'port'?"
    ]


def test_unknown_top_level_and_section_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [daemon]
        log_levle = "debug"

        [metrics]
        port = 1
        """,
    )
    errors = errors_of(path)
    assert f"{path} line 2: daemon.log_levle: unknown setting; did you mean 'log_level'?" in errors
    assert f"{path} line 4: metrics: unknown setting" in errors


def test_wrong_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [ops]
        host = "127.0.0.1"
        port = "eighty"
        """,
    )
    assert errors_of(path) == [
        f"{path} line 3: ops.port: Input should be a valid integer, "
        "unable to parse string as an integer (got 'eighty')"
    ]


def test_bad_literal_and_missing_required(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
        [[agents]]
        id = "bo"
        """
        + """
[daemon]
log_level = "loud"
""",
    )
    errors = errors_of(path)
    assert any(
        e.startswith(f"{path} line 9: agents[1].tool: required setting is missing") for e in errors
    ), errors
    assert any("daemon.log_level: Input should be 'debug', 'info'" in e for e in errors)
    assert any(e.endswith("(got 'loud')") for e in errors)


def test_unknown_driver_type_lists_known_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[channels]]
        type = "carrier-pigeon"
        name = "coo"

        [[adapters]]
        type = "fax"
        name = "fax"
        """,
    )
    assert errors_of(path) == [
        f"{path} line 2: channels[0].type: unknown type 'carrier-pigeon'; "
        f"known: {', '.join(sorted(CHANNELS))}",
        f"{path} line 6: adapters[0].type: unknown type 'fax'; "
        f"known: {', '.join(sorted(ADAPTERS))}",
    ]


def test_agent_must_reference_an_existing_adapter(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
        [[agents]]
        id = "bo"
        tool = "mqtt2"
        """,
    )
    assert errors_of(path) == [
        f"{path} line 11: agents[1].tool: no adapter named 'mqtt2'; configured: inbox"
    ]


def test_duplicate_names_and_ids_are_rejected_with_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
        [[agents]]
        id = "alice"
        tool = "inbox"

        [[adapters]]
        type = "inbox"
        name = "inbox"

        [[channels]]
        type = "web"
        name = "web"
        port = 8080

        [[channels]]
        type = "web"
        name = "web"
        port = 8082
        """,
    )
    assert errors_of(path) == [
        f"{path} line 24: channels[1].name: duplicate name 'web' (first used by channels[0])",
        f"{path} line 15: adapters[1].name: duplicate name 'inbox' (first used by adapters[0])",
        f"{path} line 10: agents[1].id: duplicate agent id 'alice' (first used by agents[0])",
    ]


def test_listener_clash_is_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [ops]
        port = 8081

        [[channels]]
        type = "web"
        name = "web"
        port = 8081
        """,
    )
    assert errors_of(path) == [
        f"{path} line 7: channels[0].port: 127.0.0.1:8081 is already used by ops.port"
    ]


def test_routing_queues_must_be_served_and_labels_known(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
        [routing]
        escalation_queue = "supervisors"

        [routing.queues]
        complaint = "complaints"
        praise = "default"
        """,
    )
    errors = errors_of(path)
    assert (
        f"{path} line 10: routing.escalation_queue: "
        "no agent serves queue 'supervisors'; served: default" in errors
    )
    assert (
        f"{path} line 13: routing.queues.complaint: "
        "no agent serves queue 'complaints'; served: default" in errors
    )
    assert any(
        e.startswith(f"{path} line 14: routing.queues.praise: unknown label 'praise'")
        for e in errors
    )


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[ops]\nport = 8081\nhost = \n")
    errors = errors_of(path)
    assert errors == [f"{path} line 3, column 8: invalid TOML: Invalid value"]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert errors_of(missing) == [f"{missing}: cannot read: No such file or directory"]
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    assert errors_of(directory)[0].startswith(f"{directory}: cannot read: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    assert errors_of(path) == [f"{path}: not valid UTF-8 at byte 5"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [ops]
        port = -1

        [outbox]
        max_attempts = 0

        [[agents]]
        id = "bad id"
        tool = "none"
        """,
    )
    paths = [e.split(": ")[1] for e in errors_of(path)]
    assert paths == ["ops.port", "outbox.max_attempts", "agents[0].id"]


# -- references and secrets -----------------------------------------------------------


def test_env_reference_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_ADMIN", "a-very-long-admin-token")
    monkeypatch.setenv("BROKER_HOST", "broker.test")
    path = write(
        tmp_path,
        """
        [ops]
        admin_token = "${ROUTER_ADMIN}"

        [[adapters]]
        type = "mqtt"
        name = "desk"
        host = "${BROKER_HOST}"
        """,
    )
    config = load_config(path)
    assert config.ops.admin_token == "a-very-long-admin-token"
    assert config.adapters[0].host == "broker.test"


def test_missing_env_var_names_variable_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMNIROUTER_NOT_SET", raising=False)
    path = write(
        tmp_path,
        """
        [[adapters]]
        type = "webhook"
        name = "crm"
        url = "https://crm.example.com/{agent_id}"
        secret = "${OMNIROUTER_NOT_SET}"
        """,
    )
    assert errors_of(path) == [
        f"{path} line 5: adapters[0].secret: environment variable OMNIROUTER_NOT_SET is not set"
    ]


def test_file_secret_is_read_relative_to_config_dir_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin").write_text("  file-admin-token-123456 \n\n", encoding="utf-8")
    path = write(tmp_path / "etc", '[ops]\nadmin_token = "file:../secrets/admin"\n')
    assert load_config(path).ops.admin_token == "file-admin-token-123456"


def test_file_secret_path_may_use_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "admin-token").write_text("credential-token-0123456\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    path = write(tmp_path, '[ops]\nadmin_token = "file:${CREDENTIALS_DIRECTORY}/admin-token"\n')
    assert load_config(path).ops.admin_token == "credential-token-0123456"
    # The directory is not a secret: it stays readable in logs.
    assert rlog.mask_secrets(str(tmp_path)) == str(tmp_path)


def test_missing_secret_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[ops]\nadmin_token = "file:nope"\n')
    assert errors_of(path) == [
        f"{path} line 2: ops.admin_token: cannot read secret file "
        f"'{tmp_path / 'nope'}': No such file or directory"
    ]


def test_secret_value_never_appears_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Too short, from the environment: invalid, and still not echoed.
    monkeypatch.setenv("SHORT_TOKEN", "tiny-s3cret")
    # A bad channel name that came from the environment is not echoed either.
    monkeypatch.setenv("CHANNEL_NAME", "Bad Name From Env")
    path = write(
        tmp_path,
        """
        [ops]
        admin_token = "${SHORT_TOKEN}"

        [[channels]]
        type = "web"
        name = "${CHANNEL_NAME}"

        [[adapters]]
        type = "mqtt"
        name = "desk"
        password = "literal-password-in-file"
        keepalive = "${SHORT_TOKEN}"
        """,
    )
    errors = errors_of(path)
    text = "\n".join(errors)
    for secret in ("tiny-s3cret", "Bad Name From Env", "literal-password-in-file"):
        assert secret not in text
    assert (
        f"{path} line 2: ops.admin_token: String should have at least 16 characters (got ***)"
        in errors
    )
    assert any(
        e.startswith(f"{path} line 6: channels[0].name: String should match") for e in errors
    )
    assert any("adapters[0].keepalive" in e and e.endswith("(got ***)") for e in errors)


def test_model_level_error_does_not_echo_the_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[adapters]]
        type = "mqtt"
        name = "desk"
        password = "literal-password-in-file"
        """,
    )
    assert errors_of(path) == [
        f"{path} line 1: adapters[0]: Value error, password needs a username"
    ]


def test_literal_secret_field_is_masked_when_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, '[ops]\nadmin_token = "short-literal"\n')
    assert errors_of(path) == [
        f"{path} line 2: ops.admin_token: String should have at least 16 characters (got ***)"
    ]


def test_resolved_secrets_are_registered_for_log_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_example_env(monkeypatch)
    load_config(EXAMPLE)
    for value in EXAMPLE_ENV.values():
        assert rlog.mask_secrets(f"x {value} y") == "x *** y"


@pytest.mark.parametrize("value", ["CHANGE_ME", "changeme", "<secret>", "Bearer CHANGE_ME"])
def test_forbidden_placeholder_is_rejected(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f'[ops]\nadmin_token = "{value}"\n')
    assert errors_of(path) == [
        f"{path} line 2: ops.admin_token: still holds the example placeholder {value!r}; "
        "set a real value"
    ]


def test_placeholder_in_env_var_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADMIN", "CHANGE_ME")
    path = write(tmp_path, '[ops]\nadmin_token = "${ADMIN}"\n')
    errors = errors_of(path)
    assert errors[0] == (
        f"{path} line 2: ops.admin_token: "
        "environment variable ADMIN still holds an example placeholder"
    )


# -- includes -------------------------------------------------------------------------


def test_includes_add_channels_adapters_and_agents(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\ninclude = ["conf.d/*.toml"]\n' + BASE)
    write(
        tmp_path,
        """
        [[channels]]
        type = "web"
        name = "web-eu"
        port = 8090
        """,
        "conf.d/10-web.toml",
    )
    write(
        tmp_path,
        """
        [[adapters]]
        type = "inbox"
        name = "night"

        [[agents]]
        id = "bo"
        tool = "night"

        [[agents]]
        id = "chen"
        tool = "inbox"
        """,
        "conf.d/20-night.toml",
    )
    write(tmp_path, "not toml at all [", "conf.d/ignored.txt")
    config = load_config(path)
    assert [c.name for c in config.channels] == ["web-eu"]
    assert [a.name for a in config.adapters] == ["inbox", "night"]
    assert [a.id for a in config.agents] == ["alice", "bo", "chen"]


def test_include_errors_name_the_included_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\ninclude = ["conf.d/*.toml"]\n' + BASE)
    inc = write(
        tmp_path,
        """
        # Bo uses a tool nobody configured.
        [[agents]]
        id = "bo"
        tool = "ghost"

        [[agents]]
        id = "alice"
        tool = "inbox"
        """,
        "conf.d/agents.toml",
    )
    errors = errors_of(path)
    assert f"{inc} line 4: agents[0].tool: no adapter named 'ghost'; configured: inbox" in errors
    assert any(
        e.startswith(
            f"{inc} line 7: agents[1].id: "
            f"duplicate agent id 'alice' (first used by agents[0] in {path})"
        )
        for e in errors
    ), errors


def test_included_file_may_not_set_other_sections(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\ninclude = ["conf.d/*.toml"]\n' + BASE)
    inc = write(tmp_path, "[ops]\nport = 1\n", "conf.d/ops.toml")
    bad = write(tmp_path, "[[agents]\n", "conf.d/broken.toml")
    errors = errors_of(path)
    assert (
        f"{inc} line 1: ops: only channels, adapters and agents may be set in an included file"
        in errors
    )
    assert any(e.startswith(f"{bad} line 1, column ") and "invalid TOML" in e for e in errors)


def test_file_secret_in_include_is_relative_to_that_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\ninclude = ["conf.d/*.toml"]\n')
    write(tmp_path, "hmac-key-in-conf-d\n", "conf.d/crm.secret")
    write(
        tmp_path,
        """
        [[adapters]]
        type = "webhook"
        name = "crm"
        url = "https://crm.example.com/{agent_id}"
        secret = "file:crm.secret"
        """,
        "conf.d/crm.toml",
    )
    config = load_config(path)
    assert config.adapters[0].secret.get_secret_value() == "hmac-key-in-conf-d"


# -- derived values -------------------------------------------------------------------


def test_db_path_is_relative_to_state_dir(tmp_path: Path) -> None:
    config = loads_config(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    assert config.db_path() == tmp_path / "omnirouter.db"
    config = loads_config(f'[daemon]\nstate_dir = "{tmp_path}"\n[store]\npath = "/srv/o.db"\n')
    assert config.db_path() == Path("/srv/o.db")


def test_state_dir_defaults_to_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OMNIROUTER_STATE_DIR", str(tmp_path))
    assert Config().daemon.state_dir == tmp_path
    assert Config().db_path() == tmp_path / "omnirouter.db"


def test_queue_for() -> None:
    config = loads_config(
        BASE
        + """
        [[agents]]
        id = "sup"
        tool = "inbox"
        queues = ["supervisors", "complaints"]

        [routing]
        escalation_queue = "supervisors"
        queues = { complaint = "complaints" }
        """
    )
    assert config.queue_for("complaint", "P2") == "complaints"
    assert config.queue_for("inquiry", "P3") == "default"
    assert config.queue_for("inquiry", "P1") == "supervisors"
    assert config.queue_for("complaint", "P0") == "supervisors"
    assert load_config(None).queue_for("complaint", "P0") == "default"


def test_config_error_accepts_plain_messages() -> None:
    exc = ConfigError("x.toml", ["something is wrong"])
    assert exc.errors == ["x.toml: something is wrong"]
    assert exc.issues[0].path == "" and exc.issues[0].line is None


def test_scheduling_and_agent_errors_name_their_path(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[[adapters]]\ntype = "inbox"\nname = "desk"\n\n'
        '[scheduling]\nbreach_target = "pager"\n\n'
        '[[agents]]\nid = "a1"\ntool = "desk"\ncapacity = { chat = 0 }\n\n'
        '[[agents]]\nid = "a2"\ntool = "desk"\n'
        '[[agents.shifts]]\ndays = "mon-fry"\nstart = "09:00"\nend = "17:00"\n'
        'tz = "Mars/Olympus"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = err.value.render()
    assert "agents[0].capacity" in text and "at least one channel type" in text
    assert "agents[1].shifts[0].days" in text and "'fry'" in text
    assert "agents[1].shifts[0].tz" in text and "Mars/Olympus" in text


def test_breach_target_must_name_an_adapter(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[[adapters]]\ntype = "inbox"\nname = "desk"\n\n[scheduling]\nbreach_target = "pager"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "scheduling.breach_target: no adapter named 'pager'" in err.value.render()


def test_agent_capacity_table_skills_and_shifts_reach_the_scheduler() -> None:
    from router.config import build_config
    from router.pipeline import agents_from_config

    config = build_config(
        {
            "adapters": [{"type": "inbox", "name": "desk"}],
            "agents": [
                {
                    "id": "bo",
                    "tool": "desk",
                    "capacity": {"chat": 3, "email": 5},
                    "skills": ["complaint", "zh", "en"],
                    "shifts": [
                        {"days": "fri-mon", "start": "22:00", "end": "06:00", "tz": "Asia/Shanghai"}
                    ],
                }
            ],
        },
        source="t.toml",
    )
    (bo,) = agents_from_config(config)
    assert dict(bo.capacities) == {"chat": 3, "email": 5} and bo.capacity == 8
    assert bo.classes == {"complaint"} and bo.languages == {"zh", "en"}
    (shift,) = bo.shifts
    assert shift.days == {4, 5, 6, 0} and (shift.start, shift.end) == (22 * 60, 6 * 60)
    assert not bo.accepts  # a file inbox cannot send accept actions


def test_routing_rules_pick_the_department_in_order() -> None:
    from router.config import build_config

    config = build_config(
        {
            "adapters": [{"type": "inbox", "name": "desk"}],
            "agents": [
                {"id": "a", "tool": "desk", "queues": ["default", "legal", "billing", "sup"]}
            ],
            "routing": {
                "escalation_queue": "sup",
                "rules": [
                    {"queue": "legal", "signals": ["legal_threat"]},
                    {"queue": "billing", "signals": ["amount_over_threshold"], "languages": ["zh"]},
                ],
            },
        },
        source="t.toml",
    )
    assert config.queue_for("complaint", "P2", signals=["legal_threat"]) == "legal"
    assert config.queue_for("inquiry", "P3", signals=["amount_over_threshold"], language="zh") == (
        "billing"
    )
    # Every condition must hold: the language does not match.
    assert config.queue_for("inquiry", "P3", signals=["amount_over_threshold"], language="en") == (
        "default"
    )
    # Escalations (P0/P1) go to the escalation queue first, rules or not.
    assert config.queue_for("complaint", "P1", signals=["legal_threat"]) == "sup"


def test_routing_rule_queue_must_be_served(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[[adapters]]\ntype = "inbox"\nname = "desk"\n\n'
        '[[agents]]\nid = "a"\ntool = "desk"\n\n'
        '[[routing.rules]]\nqueue = "legal"\nlabels = ["rant"]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = err.value.render()
    assert "routing.rules[0].queue: no agent serves queue 'legal'" in text
    assert "routing.rules[0].labels: unknown label 'rant'" in text
