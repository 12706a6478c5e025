"""ESET's 202 path: a cached request, collected by repeating it with `response-id`."""

import time
from collections.abc import Callable

import httpx

from worker.sandbox import Faults, SandboxServer, ScriptedFault

DELETE = "/eset/eu/quarantine-management/v1/quarantined-objects:batchDelete"
BODY = {"objectUuids": ["obj-1", "obj-2"]}

Auth = Callable[[httpx.Client], dict[str, str]]
Start = Callable[..., SandboxServer]


def _pend_next_call(server: SandboxServer) -> None:
    server.state.faults = Faults(script=[ScriptedFault(202)])


def _collect(
    client: httpx.Client, headers: dict[str, str], response_id: str, body: object = BODY
) -> httpx.Response:
    return client.post(DELETE, json=body, headers={**headers, "response-id": response_id})


def test_pending_request_is_collected_once_ready_then_gone(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    _pend_next_call(sandbox)
    accepted = client.post(DELETE, json=BODY, headers=eset_headers)
    response_id = accepted.headers["response-id"]

    still_pending = _collect(client, eset_headers, response_id)
    time.sleep(sandbox.config.pending_s)
    ready = _collect(client, eset_headers, response_id)
    again = _collect(client, eset_headers, response_id)

    assert (accepted.status_code, accepted.content) == (202, b"")
    assert still_pending.status_code == 202
    assert still_pending.headers["response-id"] == response_id
    assert (ready.status_code, ready.json()) == (200, {})
    assert again.status_code == 404
    assert sandbox.state.stats()["collects"] == 3


def test_pending_mutation_applies_its_effect_once(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    _pend_next_call(sandbox)
    response_id = client.post(DELETE, json=BODY, headers=eset_headers).headers["response-id"]
    _collect(client, eset_headers, response_id)
    time.sleep(sandbox.config.pending_s)
    _collect(client, eset_headers, response_id)

    assert sandbox.state.stats()["effects"]["eset.batch_delete"] == {"obj-1": 1, "obj-2": 1}


def test_collect_may_use_another_token(
    sandbox: SandboxServer, client: httpx.Client, eset_auth: Auth
) -> None:
    _pend_next_call(sandbox)
    response_id = client.post(DELETE, json=BODY, headers=eset_auth(client)).headers["response-id"]
    time.sleep(sandbox.config.pending_s)

    assert _collect(client, eset_auth(client), response_id).status_code == 200


def test_collect_with_different_body_is_400(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    _pend_next_call(sandbox)
    response_id = client.post(DELETE, json=BODY, headers=eset_headers).headers["response-id"]

    response = _collect(client, eset_headers, response_id, {"objectUuids": ["obj-3"]})

    assert response.status_code == 400


def test_collect_of_unknown_response_id_is_404(
    client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    response = _collect(client, eset_headers, "6b0e3c5e-1d1a-4f1e-9a55-3c1f3e2b9d10")

    assert response.status_code == 404


def test_accepted_first_rate_pends_fresh_calls_but_not_collects(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(accepted_first_rate=1.0)
    accepted = client.post(DELETE, json=BODY, headers=eset_headers)
    time.sleep(sandbox.config.pending_s)

    assert accepted.status_code == 202
    assert _collect(client, eset_headers, accepted.headers["response-id"]).status_code == 200


def test_collect_past_collect_timeout_is_504_and_nothing_ran(
    start_sandbox: Start, eset_auth: Auth
) -> None:
    server = start_sandbox(pending_s=5, collect_timeout_s=0.2)
    _pend_next_call(server)
    with httpx.Client(base_url=server.base_url) as client:
        headers = eset_auth(client)
        response_id = client.post(DELETE, json=BODY, headers=headers).headers["response-id"]
        time.sleep(0.25)
        timed_out = _collect(client, headers, response_id)
        after = _collect(client, headers, response_id)

    assert (timed_out.status_code, after.status_code) == (504, 404)
    assert server.state.stats()["effects"] == {}


def test_uncollected_answer_is_dropped_after_cache_ttl(
    start_sandbox: Start, eset_auth: Auth
) -> None:
    server = start_sandbox(pending_s=0, cache_ttl_s=0.2)
    _pend_next_call(server)
    with httpx.Client(base_url=server.base_url) as client:
        headers = eset_auth(client)
        response_id = client.post(DELETE, json=BODY, headers=headers).headers["response-id"]
        time.sleep(0.25)
        response = _collect(client, headers, response_id)

    assert response.status_code == 404
