"""The conf.d worked example loads with the example config, as README's steps install it."""

from __future__ import annotations

import shutil
from pathlib import Path

from router.config import load_config
from tests.daemon_harness import REPO


def test_the_worked_conf_d_example_adds_its_channel_adapter_and_agent(tmp_path: Path) -> None:
    etc = tmp_path / "etc-omnirouter"
    (etc / "conf.d").mkdir(parents=True)
    shutil.copy(REPO / "config" / "omnirouter.example.toml", etc / "omnirouter.toml")
    for f in (REPO / "config" / "conf.d-example").glob("*.toml"):
        shutil.copy(f, etc / "conf.d" / f.name)
    config = load_config(etc / "omnirouter.toml", secrets=False)
    assert "support-mail" in {c.name for c in config.channels}
    assert "billing-crm" in {a.name for a in config.adapters}
    dana = next(a for a in config.agents if a.id == "dana")
    assert dana.tool == "billing-crm" and dana.queues == ["billing"]
    skipped = {ref for _, ref in config.unresolved_secrets}
    assert "${BILLING_CRM_WEBHOOK_SECRET}" in skipped
