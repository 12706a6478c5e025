"""Static settings of the vendor sandbox, fixed for the life of one server."""

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


def _documented_rate_limits() -> dict[str, int | None]:
    # ESET documents 10 calls/s per account; fylr and Spaaza publish no limit.
    return {"eset": 10, "fylr": None, "spaaza": None}


class SandboxConfig(BaseModel):
    """Credentials the sandbox accepts, and the timings of its vendor behaviour.

    The defaults are the documented vendor values, except `pending_s`, kept short so
    that tests and demos exercising ESET's 202 path do not wait 30 s.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Sub-addresses (api+acme@sandbox.example) are accounts of their own, same password.
    eset_username: str = "api@sandbox.example"
    eset_password: str = "sandbox-password"
    fylr_username: str = "relay"
    fylr_password: str = "sandbox-password"
    fylr_client_id: str = "command-relay"
    fylr_client_secret: str = "sandbox-secret"
    spaaza_token_id: str = "sandbox-id"
    spaaza_token_secret: str = "sandbox-secret"

    token_ttl_s: int = Field(default=3600, ge=1)
    # Calls per vendor account in a sliding 1 s window; None or a missing vendor = unlimited.
    rate_limit_per_s: Mapping[str, int | None] = Field(default_factory=_documented_rate_limits)
    # ESET 202: how long a cached request stays pending before its answer is ready.
    pending_s: float = Field(default=0.3, ge=0)
    # ESET 202: a collect later than this after the first 202 gets 504 (if still pending).
    collect_timeout_s: float = Field(default=120, gt=0)
    # ESET 202: a ready answer not collected within this is dropped (collect gets 404).
    cache_ttl_s: float = Field(default=600, gt=0)
    # fylr: delay between an acknowledged cancel and the task reaching status `canceled`.
    fylr_cancel_settle_s: float = Field(default=0.2, ge=0)
    # Seed of the generator drawing random faults; None = a different run each time.
    random_seed: int | None = None
