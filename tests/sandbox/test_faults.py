"""Fault switches: scripted answers, random rates, latency."""

import httpx
import pytest

from worker.sandbox import Faults, SandboxServer, ScriptedFault

PATCHING = "/eset/eu/patch-management/v1/application-patching-processes/recent/details"
TRIGGERS = "/eset/eu/automation/v1/device_tasks/3f2b8c1e-1111:updateTaskTriggers"
TOKEN = "/eset/eu/business-account.iam/oauth/token"


def test_scripted_faults_are_consumed_in_order(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(503), ScriptedFault(500)])

    statuses = [client.get(PATCHING, headers=eset_headers).status_code for _ in range(3)]

    assert statuses == [503, 500, 200]
    assert sandbox.state.faults.script == []


def test_scripted_fault_waits_for_a_call_on_its_path(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(502, path_contains="updateTaskTriggers")])
    body: dict[str, object] = {"triggers": [{"manual": {}}]}

    unrelated = client.get(PATCHING, headers=eset_headers)
    matching = client.post(TRIGGERS, json=body, headers=eset_headers)
    later = client.post(TRIGGERS, json=body, headers=eset_headers)

    assert [unrelated.status_code, matching.status_code, later.status_code] == [200, 502, 200]
    assert matching.json()["code"] == 14  # google.rpc UNAVAILABLE


def test_token_calls_are_never_faulted(
    eset_password_form: dict[str, str], sandbox: SandboxServer, client: httpx.Client
) -> None:
    sandbox.state.faults = Faults(error_rate=1.0, script=[ScriptedFault(500)])
    form = eset_password_form

    assert client.post(TOKEN, data=form).status_code == 200
    assert len(sandbox.state.faults.script) == 1


def test_scripted_fault_on_fylr_has_fylr_error_body(
    sandbox: SandboxServer, client: httpx.Client, fylr_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(503)])

    response = client.get("/fylr/api/v1/task/17", headers=fylr_headers)

    assert response.status_code == 503
    assert response.json()["statuscode"] == 503


def test_scripted_202_is_left_for_eset(
    sandbox: SandboxServer, client: httpx.Client, spaaza_headers: dict[str, str]
) -> None:
    """Only ESET has a pending path; a scripted 202 waits for an ESET call."""
    sandbox.state.faults = Faults(script=[ScriptedFault(202)])

    response = client.put("/spaaza/tasks/5", json={"desc": "x"}, headers=spaaza_headers)

    assert response.status_code == 200
    assert len(sandbox.state.faults.script) == 1


def test_throttle_rate_one_answers_429(
    sandbox: SandboxServer, client: httpx.Client, spaaza_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(throttle_rate=1.0)

    response = client.put("/spaaza/tasks/5", json={"desc": "x"}, headers=spaaza_headers)

    assert response.status_code == 429
    assert sandbox.state.stats()["throttled"] == 1
    assert sandbox.state.stats()["effects"] == {}


def test_error_rate_one_answers_server_errors(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(error_rate=1.0)

    statuses = {client.get(PATCHING, headers=eset_headers).status_code for _ in range(8)}

    assert statuses <= {500, 502, 503}


def test_latency_delays_api_calls_but_not_token_calls(
    eset_password_form: dict[str, str],
    sandbox: SandboxServer,
    client: httpx.Client,
    eset_headers: dict[str, str],
) -> None:
    sandbox.state.faults = Faults(latency_ms=150)
    form = eset_password_form

    token_s = client.post(TOKEN, data=form).elapsed.total_seconds()
    api_s = client.get(PATCHING, headers=eset_headers).elapsed.total_seconds()

    assert token_s < 0.1
    assert api_s >= 0.15


def test_faults_are_replaced_over_http(sandbox: SandboxServer, client: httpx.Client) -> None:
    body: dict[str, object] = {
        "throttle_rate": 0.5,
        "script": [{"status": 202, "path_contains": "batchDelete"}],
    }

    response = client.put("/_sandbox/faults", json=body)

    assert response.status_code == 200
    assert sandbox.state.faults == Faults(
        throttle_rate=0.5, script=[ScriptedFault(202, path_contains="batchDelete")]
    )


@pytest.mark.parametrize(
    "body", [{"error_rate": 2}, {"script": [{"status": 302}]}, {"surprise": 1}], ids=str
)
def test_invalid_faults_are_422(client: httpx.Client, body: dict[str, object]) -> None:
    assert client.put("/_sandbox/faults", json=body).status_code == 422
