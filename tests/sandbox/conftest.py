"""A real sandbox server per session, reset before each test, and clients for it."""

from collections.abc import Callable, Iterator

import httpx
import pytest

from worker.sandbox import SandboxConfig, SandboxServer

ESET_TOKEN = "/eset/eu/business-account.iam/oauth/token"
FYLR_TOKEN = "/fylr/api/oauth2/token"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServer]:
    """The shared sandbox, with the documented defaults (ESET: 10 calls/s)."""
    with SandboxServer(SandboxConfig(random_seed=7)) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_sandbox(sandbox: SandboxServer) -> None:
    sandbox.state.reset()


@pytest.fixture(scope="session")
def client(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base_url, timeout=5) as http:
        yield http


def _eset_password_form() -> dict[str, str]:
    config = SandboxConfig()
    return {
        "grant_type": "password",
        "username": config.eset_username,
        "password": config.eset_password,
    }


@pytest.fixture
def eset_password_form() -> dict[str, str]:
    """Form of the ESET password grant with the sandbox's default credentials."""
    return _eset_password_form()


def eset_password_grant(http: httpx.Client, path: str = ESET_TOKEN) -> httpx.Response:
    """The token call with the sandbox's default ESET credentials."""
    return http.post(path, data=_eset_password_form())


@pytest.fixture(scope="session")
def eset_login() -> Callable[[httpx.Client], httpx.Response]:
    """Make the ESET password grant through a given client (for dedicated servers)."""
    return eset_password_grant


def eset_bearer(http: httpx.Client) -> dict[str, str]:
    """Authorization headers for ESET API calls, from a fresh password grant."""
    return {"Authorization": f"Bearer {eset_password_grant(http).json()['access_token']}"}


@pytest.fixture
def eset_headers(client: httpx.Client) -> dict[str, str]:
    """Authorization for ESET API calls, from a fresh password grant."""
    return eset_bearer(client)


@pytest.fixture(scope="session")
def eset_auth() -> Callable[[httpx.Client], dict[str, str]]:
    """Make ESET authorization headers through a given client (for dedicated servers)."""
    return eset_bearer


@pytest.fixture
def fylr_headers(client: httpx.Client) -> dict[str, str]:
    """Authorization for fylr API calls, from a client-credentials grant."""
    config = SandboxConfig()
    form = {
        "grant_type": "client_credentials",
        "client_id": config.fylr_client_id,
        "client_secret": config.fylr_client_secret,
    }
    token = client.post(FYLR_TOKEN, data=form).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def spaaza_headers() -> dict[str, str]:
    config = SandboxConfig()
    return {"Authorization": f"Bearer {config.spaaza_token_id}:{config.spaaza_token_secret}"}


@pytest.fixture
def start_sandbox() -> Iterator[Callable[..., SandboxServer]]:
    """Start a dedicated sandbox with other config values; stopped after the test."""
    servers: list[SandboxServer] = []

    def start(**config: object) -> SandboxServer:
        server = SandboxServer(SandboxConfig.model_validate(config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
