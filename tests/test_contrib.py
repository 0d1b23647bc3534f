"""The Grafana dashboard and the Prometheus rules under contrib/ fit the live /metrics.

Both files parse, every PromQL expression in them parses (promql-parser, the Rust port
of Prometheus' own parser), and every metric they name is in the exposition of a
running daemon, so a renamed metric breaks this test instead of a 3 a.m. dashboard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.daemon_harness import REPO, DaemonProcess, base_config, http, ports

TOKEN = "contrib-test-admin-token-0123456789"
DASHBOARD = REPO / "contrib" / "grafana" / "omnirouter.json"
RULES = REPO / "contrib" / "prometheus" / "omnirouter-rules.yml"
# Grafana's variables, replaced by what Grafana would put there before PromQL is parsed.
_GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "30s", "$channel": ".*"}
_LABEL_VALUES = re.compile(r"label_values\((\w+),\s*\w+\)")
# What the rules must watch (issue 14): SLA breaches, dead letters, a channel or an
# adapter down, a crisis raised, store latency and the store failing.
REQUIRED_ALERTS = {
    "OmnirouterSLABreaches",
    "OmnirouterDeadLettersGrowing",
    "OmnirouterChannelDown",
    "OmnirouterAdapterDown",
    "OmnirouterCrisisRaised",
    "OmnirouterStoreLatencyHigh",
    "OmnirouterStoreNotOk",
}


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Return the /metrics text of a daemon holding one message that waits (agents off)."""
    workdir: Path = tmp_path_factory.mktemp("contrib")
    web_port, ops_port = ports()
    proc = DaemonProcess(
        workdir,
        base_config(workdir / "state", web_port=web_port, ops_port=ops_port, admin_token=TOKEN),
    )
    try:
        proc.start()
        for agent in ("alice", "bo"):
            status, _, _ = http(
                "POST",
                f"http://127.0.0.1:{ops_port}/v1/agents/{agent}/presence/off",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert status == 200
        message = {"text": "My parcel has not arrived", "contact": {"handle": "a@example.com"}}
        status, _, _ = http("POST", f"http://127.0.0.1:{web_port}/v1/messages", message)
        assert status == 201
        status, text, _ = http("GET", f"http://127.0.0.1:{ops_port}/metrics")
        assert status == 200
        return str(text)
    finally:
        proc.close()


def exposed_names(text: str) -> set[str]:
    """Return every series name a query may use: declared families and their suffixes.

    A histogram family `x` is queried as x_bucket, x_sum and x_count; a counter is
    declared with its `_total` name. Families without samples yet (no label values
    seen) still count: their TYPE line shows the daemon exports them.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    """Parse a PromQL expression (Grafana variables filled in) and return its metric names."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    found: set[str] = set()
    _walk(promql_parser.parse(expr), found)
    return found


def _walk(node: Any, found: set[str]) -> None:
    """Collect the metric names of every selector under node."""
    if isinstance(node, promql_parser.MatrixSelector):
        node = node.vector_selector
    if isinstance(node, promql_parser.VectorSelector):
        assert node.name, "a selector without a metric name"
        found.add(node.name)
        return
    for attr in ("lhs", "rhs", "expr", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            _walk(child, found)
    for arg in getattr(node, "args", None) or ():
        _walk(arg, found)


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (where, expr) for every query of the dashboard: panels and annotations."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        yield annotation["name"], annotation["expr"]


def rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every rule of every group."""
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_dashboard_is_importable_grafana_json() -> None:
    """The dashboard parses, asks for a Prometheus data source and has unique panel ids."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "omnirouter"
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_rules_are_well_formed() -> None:
    """The rules parse as YAML; each alert has an expr, a severity and a summary."""
    document = yaml.safe_load(RULES.read_text())
    names = set()
    for rule in rules(document):
        names.add(rule["alert"])
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        metric_names(rule["expr"])  # parses
    assert REQUIRED_ALERTS <= names


def test_every_metric_the_dashboard_uses_is_exported(exposition: str) -> None:
    """Each metric named by a panel, annotation or variable is in the live /metrics."""
    exported = exposed_names(exposition)
    dashboard = json.loads(DASHBOARD.read_text())
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs(dashboard):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    for variable in dashboard["templating"]["list"]:
        for name in _LABEL_VALUES.findall(json.dumps(variable.get("query", ""))):
            used.setdefault(name, set()).add(variable["name"])
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing
    # And the other way: every family the daemon exports has a panel.
    families = {
        line.split(" ")[2]
        for line in exposition.splitlines()
        if line.startswith("# TYPE ") and not line.split(" ")[2].endswith("_created")
    }
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families - shown == set()


def test_every_metric_the_rules_use_is_exported(exposition: str) -> None:
    """Each metric named by an alert's expr is in the live /metrics."""
    exported = exposed_names(exposition)
    missing = {
        rule["alert"]: sorted(metric_names(rule["expr"]) - exported)
        for rule in rules(yaml.safe_load(RULES.read_text()))
        if metric_names(rule["expr"]) - exported
    }
    assert not missing


def test_queue_oldest_wait_is_exported(exposition: str) -> None:
    """A message waiting for an agent shows in its queue's depth and oldest wait."""
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(("omnirouter_queue_depth{", "omnirouter_queue_oldest_wait_seconds{"))
    }
    waiting = [k for k, v in samples.items() if k.startswith("omnirouter_queue_depth") and v]
    assert len(waiting) == 1
    queue = waiting[0].removeprefix("omnirouter_queue_depth")  # '{queue="…"}'
    # Milliseconds at most here (rounded to them), so only its presence is certain.
    assert samples[f"omnirouter_queue_oldest_wait_seconds{queue}"] >= 0


def test_a_renamed_metric_is_caught() -> None:
    """The check sees through aggregations, functions and binary operators."""
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(omnirouter_ingest_seconds_bucket"
        '[$__rate_interval]))) / on() group_left sum(omnirouter_outbox_backlog{a="b"}) > 0'
        " or absent(omnirouter_gone)"
    )
    assert metric_names(expr) == {
        "omnirouter_ingest_seconds_bucket",
        "omnirouter_outbox_backlog",
        "omnirouter_gone",
    }
    exported = exposed_names(
        "# TYPE omnirouter_ingest_seconds histogram\n# TYPE omnirouter_outbox_backlog gauge\n"
    )
    assert metric_names(expr) - exported == {"omnirouter_gone"}
