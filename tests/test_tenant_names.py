"""Tenant names are case-insensitive: configured in lower case whatever their spelling
(environment names are case-insensitive), and found by a command whatever its case."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from worker.admin.config import ConfigError, load_settings
from worker.sandbox import SandboxServer
from worker.sandbox.worker_setup import sandbox_tenant
from worker.settings import Settings

from .harness import embedded, running_relay


def test_names_from_the_environment_and_from_json_are_kept_in_lower_case(
    monkeypatch: pytest.MonkeyPatch,
):
    assert list(Settings(tenants={"Globex": {}}).tenants) == ["globex"]
    monkeypatch.setenv("RELAY_TENANTS__ACME__FYLR__BASE_URL", "https://fylr.example")
    monkeypatch.setenv("RELAY_TENANTS__ACME__FYLR__CLIENT_ID", "client")
    monkeypatch.setenv("RELAY_TENANTS__ACME__FYLR__CLIENT_SECRET", "secret")
    settings = Settings()
    assert list(settings.tenants) == ["acme"]
    assert settings.tenants.get("ACME") is settings.tenants["Acme"] is settings.tenants["acme"]
    assert "aCmE" in settings.tenants and "globex" not in settings.tenants


def test_two_names_differing_only_in_case_are_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RELAY_TENANTS", '{"Acme": {}, "acme": {}}')
    with pytest.raises(ConfigError) as refused:
        load_settings()
    (line,) = refused.value.lines()
    assert line.startswith("error: RELAY_TENANTS: two tenants differ only in case")


def test_a_command_naming_its_tenant_in_capitals_is_run(sandbox: SandboxServer, tmp_path: Path):
    """ESET commands of the tenant go through its lane, fylr's straight from the queue."""
    tenant = sandbox_tenant(sandbox.base_url, sandbox.state.config)
    with running_relay(sandbox, tenants={"Acme": tenant}, **embedded(tmp_path)) as relay:
        assert [lane.name for lane in relay.service.consumer.topology.lanes.values()] == [
            "eset.acme"
        ]
        relay.send({"type": "cancel-task", "tenant": "ACME", "params": {"task_id": 801}})
        relay.send({"type": "batch-delete", "tenant": "Acme",
                    "params": {"object_uuids": [str(uuid.uuid4())]}})
        events = relay.events(2)
    assert {(e.data.type, e.data.outcome) for e in events} == {
        ("cancel-task", "succeeded"), ("batch-delete", "succeeded")
    }
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"801": 1}
