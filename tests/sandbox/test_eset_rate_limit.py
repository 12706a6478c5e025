"""ESET's 10 calls/s per account."""

from typing import Any

import httpx

from worker.sandbox import Faults, SandboxConfig, SandboxServer, SandboxState, ScriptedFault

PATCHING = "/eset/eu/patch-management/v1/application-patching-processes/recent/details"
TOKEN = "/eset/eu/business-account.iam/oauth/token"


def test_eleventh_call_within_a_second_is_429_without_retry_after(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    statuses = [client.get(PATCHING, headers=eset_headers).status_code for _ in range(11)]
    last = client.get(PATCHING, headers=eset_headers)

    assert statuses == [200] * 10 + [429]
    assert last.status_code == 429
    assert "retry-after" not in last.headers
    assert sandbox.state.stats()["throttled"] == 2


def test_limit_is_per_account_not_per_token(
    eset_password_form: dict[str, str], client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    for _ in range(10):
        client.get(PATCHING, headers=eset_headers)
    form = eset_password_form
    other_token = client.post(TOKEN, data=form).json()["access_token"]

    response = client.get(PATCHING, headers={"Authorization": f"Bearer {other_token}"})

    assert response.status_code == 429


def test_sub_addressed_users_are_accounts_with_their_own_limit(
    eset_password_form: dict[str, str], client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    for _ in range(10):
        client.get(PATCHING, headers=eset_headers)
    local, domain = eset_password_form["username"].split("@")
    form = {**eset_password_form, "username": f"{local}+quiet@{domain}"}
    quiet_token = client.post(TOKEN, data=form).json()["access_token"]

    response = client.get(PATCHING, headers={"Authorization": f"Bearer {quiet_token}"})

    assert response.status_code == 200


def test_unrelated_user_is_refused(
    eset_password_form: dict[str, str], client: httpx.Client
) -> None:
    local, domain = eset_password_form["username"].split("@")
    for username in (f"{local}x@{domain}", f"{local}+q@other.example", f"{local}+q"):
        response = client.post(TOKEN, data={**eset_password_form, "username": username})
        assert response.status_code == 400, username


def test_token_calls_do_not_count(
    eset_password_form: dict[str, str], client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    form = eset_password_form
    for _ in range(12):
        client.post(TOKEN, data=form)

    statuses = {client.get(PATCHING, headers=eset_headers).status_code for _ in range(10)}

    assert statuses == {200}


def test_collects_count_as_calls(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(202)])
    response_id = client.get(PATCHING, headers=eset_headers).headers["response-id"]
    collect_headers = {**eset_headers, "response-id": response_id}
    for _ in range(9):
        client.get(PATCHING, headers=collect_headers)

    assert client.get(PATCHING, headers=collect_headers).status_code == 429


# --- the busiest second, refused calls included ---


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def eset_peak(stats: dict[str, Any], account: str = SandboxConfig().eset_username) -> int:
    """The busiest second of one ESET account (the sandbox's default user by default)."""
    return int(stats["max_calls_in_window"]["eset"][account])


def test_eleven_calls_within_a_second_are_seen_as_eleven(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    statuses = [client.get(PATCHING, headers=eset_headers).status_code for _ in range(11)]

    assert statuses == [200] * 10 + [429]  # the refusal is unchanged
    stats = client.get("/_sandbox/stats").json()  # what the chaos rig reads
    assert eset_peak(stats) == 11
    assert eset_peak(sandbox.state.stats()) == 11


def test_refused_calls_count_as_arrivals() -> None:
    clock = FakeClock()
    state = SandboxState(SandboxConfig(), clock=clock)
    admitted = []
    for _ in range(25):  # 25 calls in 0.24 s
        admitted.append(state.admit("eset", "acct"))
        clock.now += 0.01

    assert admitted == [True] * 10 + [False] * 15
    assert state.stats()["max_calls_in_window"] == {"eset": {"acct": 25}}


def test_calls_spaced_0_11_s_apart_are_ten_per_window() -> None:
    clock = FakeClock()
    state = SandboxState(SandboxConfig(), clock=clock)
    for index in range(30):
        clock.now = 1000.0 + index * 0.11
        assert state.admit("eset", "acct")

    assert state.stats()["max_calls_in_window"]["eset"] == {"acct": 10}


def test_a_call_exactly_one_window_later_starts_a_new_window() -> None:
    clock = FakeClock()
    state = SandboxState(SandboxConfig(), clock=clock)
    for index in range(20):  # every 0.1 s: (t - 1, t] holds 10 calls, never 11
        clock.now = 1000.0 + index / 10
        state.admit("eset", "acct")

    assert eset_peak(state.stats(), "acct") == 10


def test_peaks_are_per_account_and_per_vendor() -> None:
    clock = FakeClock()
    state = SandboxState(SandboxConfig(), clock=clock)
    for _ in range(3):
        state.admit("eset", "a")
    for _ in range(5):
        state.admit("eset", "b")
    for _ in range(12):  # fylr has no limit: nothing refused, still counted
        assert state.admit("fylr", "a")

    assert state.stats()["max_calls_in_window"] == {
        "eset": {"a": 3, "b": 5},
        "fylr": {"a": 12},
    }


def test_reset_forgets_the_peaks(sandbox: SandboxServer) -> None:
    sandbox.state.admit("eset", "acct")
    sandbox.state.reset()

    assert sandbox.state.stats()["max_calls_in_window"] == {}
