"""Server lifecycle and the /_sandbox control routes."""

import httpx
import pytest

from worker.sandbox import Faults, SandboxConfig, SandboxServer, create_app
from worker.sandbox.state import SandboxState

PATCHING = "/eset/eu/patch-management/v1/application-patching-processes/recent/details"


def test_stats_over_http_match_state(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    client.get(PATCHING, headers=eset_headers)

    assert client.get("/_sandbox/stats").json() == sandbox.state.stats()


def test_reset_forgets_counters_tokens_and_faults(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(error_rate=1.0)

    client.post("/_sandbox/reset")

    assert sandbox.state.stats()["calls"] == {}
    assert sandbox.state.faults == Faults()
    assert client.get(PATCHING, headers=eset_headers).status_code == 401


def test_server_binds_a_free_port_and_stops() -> None:
    with SandboxServer(SandboxConfig()) as first, SandboxServer() as second:
        assert first.base_url != second.base_url
        assert httpx.get(f"{second.base_url}/_sandbox/stats").status_code == 200

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{second.base_url}/_sandbox/stats")


def test_create_app_exposes_its_state() -> None:
    state = SandboxState(SandboxConfig())

    assert create_app(SandboxConfig(), state).state.sandbox is state
