"""schemathesis against the live daemon: no 5xx, and every answer is what the schema says.

The real daemon runs as a subprocess (web channel + ops API + a file-inbox agent tool,
as the embedded default), and each documented operation of router/openapi.json gets a
bounded number of generated requests, valid and invalid, from a fixed seed. Every
answer must be below 500 and conform to the document: a documented status code,
content type, required headers and a body matching the response schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from router.openapi import document_for
from tests.daemon_harness import DaemonProcess, base_config, http, ports

TOKEN = "schemathesis-admin-token-0123456789"
SEED = int(os.environ.get("OMNIROUTER_SCHEMATHESIS_SEED", "20261204"))
# Per operation and generation mode: the whole file stays well under 60 s. Set
# OMNIROUTER_SCHEMATHESIS_EXAMPLES (and _SEED) to search harder by hand.
EXAMPLES = int(os.environ.get("OMNIROUTER_SCHEMATHESIS_EXAMPLES", "12"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MESSAGE = {"text": "My parcel has not arrived", "contact": {"handle": "alice@example.com"}}
_METHODS = ("get", "put", "post", "delete", "options", "patch")


def _negatable(operation: dict[str, Any]) -> bool:
    """Return whether an operation has anything invalid data can be made of.

    Without a body and with only unconstrained string parameters every request is
    valid, and hypothesis would find no negative example at all.
    """
    if "requestBody" in operation:
        return True
    return any(set(p["schema"]) != {"type"} for p in operation.get("parameters", ()))


def _operations() -> list[Any]:
    """Return (mode, part, method, path) of every operation, both modes where possible."""
    out = []
    for part in ("customer", "ops"):
        for path, item in document_for(part)["paths"].items():  # type: ignore[arg-type]
            for method in set(item) & set(_METHODS):
                out.append(pytest.param(GenerationMode.POSITIVE, part, method, path))
                if _negatable(item[method]):
                    out.append(pytest.param(GenerationMode.NEGATIVE, part, method, path))
    return sorted(out, key=lambda p: (p.values[1], p.values[3], p.values[2], str(p.values[0])))


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Run the daemon; yield the base URL of each listener by part."""
    workdir: Path = tmp_path_factory.mktemp("schemathesis")
    web_port, ops_port = ports()
    proc = DaemonProcess(
        workdir,
        base_config(workdir / "state", web_port=web_port, ops_port=ops_port, admin_token=TOKEN),
    )
    try:
        proc.start()
        web, ops = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{ops_port}"
        status, answer, _ = http("POST", web + "/v1/messages", MESSAGE)
        assert status == 201, answer
        yield {
            "customer": web,
            "ops": ops,
            "ticket": answer["ticket"],
            "status_token": answer["status_token"],
            "message_id": answer["message_id"],
        }
    finally:
        proc.close()


@pytest.mark.parametrize(("mode", "part", "method", "path"), OPERATIONS, ids=str)
def test_operation_conforms(
    daemon: dict[str, str], mode: GenerationMode, part: str, method: str, path: str
) -> None:
    """Generated requests to one operation get no 5xx and only documented answers."""
    schema = schemathesis.openapi.from_dict(document_for(part))  # type: ignore[arg-type]
    operation = schema[path][method.upper()]
    base_url = daemon[part]
    headers: dict[str, Any] = {"Authorization": f"Bearer {TOKEN}"} if part == "ops" else {}

    # No shrinking: a failure is reported with the example as generated, within bounds.
    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)

    check()


def _real(daemon: dict[str, str], name: str) -> dict[str, Any]:
    """Return the fixed parameters that aim an operation at the daemon's real ticket."""
    ticket, message_id = daemon["ticket"], daemon["message_id"]
    return {
        "status": {
            "path_parameters": {"ticket": ticket},
            "headers": {"Authorization": f"Bearer {daemon['status_token']}"},
        },
        "events": {"path_parameters": {"ticket": ticket}},
        "actions": {"path_parameters": {"ticket": ticket}},
        "label": {"path_parameters": {"message_id": message_id}},
        "accept": {"path_parameters": {"message_id": message_id}},
        "contacts": {"query": {"q": "example"}},
    }[name]


# Operations aimed at what exists (random ids mostly meet 404s): name, part, method, path.
REAL = [
    ("status", "customer", "get", "/v1/tickets/{ticket}"),
    ("events", "ops", "get", "/v1/tickets/{ticket}/events"),
    ("actions", "ops", "post", "/v1/tickets/{ticket}/actions"),
    ("label", "ops", "post", "/v1/messages/{message_id}/label"),
    ("accept", "ops", "post", "/v1/messages/{message_id}/accept"),
    ("contacts", "ops", "get", "/v1/contacts"),
]


@pytest.mark.parametrize(("name", "part", "method", "path"), REAL, ids=[r[0] for r in REAL])
def test_operation_on_a_real_ticket_conforms(
    daemon: dict[str, str], name: str, part: str, method: str, path: str
) -> None:
    """Generated requests about the ticket the fixture created conform too (200s included)."""
    schema = schemathesis.openapi.from_dict(document_for(part))  # type: ignore[arg-type]
    operation = schema[path][method.upper()]
    fixed = _real(daemon, name)
    base_url = daemon[part]
    headers: dict[str, Any] = {"Authorization": f"Bearer {TOKEN}"} if part == "ops" else {}
    headers.update(fixed.get("headers", {}))
    statuses: list[int] = []

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(**fixed))
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url, headers=headers, checks=CHECKS, timeout=10
        )
        statuses.append(response.status_code)

    check()
    if name in ("status", "events", "contacts"):
        assert 200 in statuses  # the real ticket was reached, not only refusals
