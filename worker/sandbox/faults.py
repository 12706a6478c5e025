"""Fault switches a test or demo flips at runtime, and the draw of one call's fault."""

import dataclasses
from random import Random
from typing import Annotated, Any

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic.dataclasses import dataclass

from worker.sandbox.hostile import (
    BadRetryAfter,
    BadToken,
    Drip,
    Echo,
    HostileFault,
    HugeHeaders,
    OddBody,
    PendingId,
    Redirect,
    Reset,
)

PENDING = 202
_SERVER_ERRORS = (500, 502, 503)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ScriptedFault:
    """One planned answer, consumed by the first vendor API call it matches.

    `status` 202 is a real ESET pending answer (the request is cached and collectable);
    it matches only fresh ESET calls, never a collect or another vendor. Any other
    status is answered as that error, with the vendor's error body.
    """

    status: int
    path_contains: str | None = None
    # The call is carried out, then answered with `status` instead of its result: the
    # vendor acted and the answer was lost (a gateway 502/504, a timeout on the way back).
    answer_lost: bool = False

    @field_validator("status")
    @classmethod
    def _is_pending_or_error(cls, status: int) -> int:
        if status != PENDING and not 400 <= status <= 599:
            raise ValueError("a scripted fault is 202 or an error status (400-599)")
        return status

    def matches(self, path: str, *, pending_allowed: bool) -> bool:
        """True when this fault applies to a call on `path`."""
        if self.status == PENDING and not pending_allowed:
            return False
        return self.path_contains is None or self.path_contains in path


def _entry_kind(entry: Any) -> str:
    """A script entry's tag: its `kind` (hostile faults), else `status` (a ScriptedFault)."""
    kind = entry.get("kind") if isinstance(entry, dict) else getattr(entry, "kind", None)
    return kind if isinstance(kind, str) else "status"


# One planned answer: a status (no `kind`), or a hostile fault named by its `kind`.
ScriptEntry = Annotated[
    Annotated[ScriptedFault, Tag("status")]
    | Annotated[Redirect, Tag("redirect")]
    | Annotated[PendingId, Tag("pending-id")]
    | Annotated[Drip, Tag("drip")]
    | Annotated[Reset, Tag("reset")]
    | Annotated[OddBody, Tag("odd-body")]
    | Annotated[Echo, Tag("echo")]
    | Annotated[BadToken, Tag("bad-token")]
    | Annotated[BadRetryAfter, Tag("bad-retry-after")]
    | Annotated[HugeHeaders, Tag("huge-headers")],
    Discriminator(_entry_kind),
]


@dataclass(config=ConfigDict(extra="forbid", validate_assignment=True))
class Faults:
    """Switches read on every vendor API call, and the script of planned answers.

    Status faults (`ScriptedFault`) and the random draws never touch token calls; hostile
    faults (`worker.sandbox.hostile`) answer the calls their `route` names, token calls
    included, and are matched first, before the call is authenticated or rate-limited.
    """

    latency_ms: float = Field(default=0, ge=0)
    accepted_first_rate: float = Field(default=0, ge=0, le=1)
    throttle_rate: float = Field(default=0, ge=0, le=1)
    error_rate: float = Field(default=0, ge=0, le=1)
    script: list[ScriptEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Drawn:
    """One call's fault: the status to answer, and whether the call is carried out first."""

    status: int
    answer_lost: bool = False


def pick_fault(
    faults: Faults, path: str, rng: Random, *, pending_allowed: bool
) -> Drawn | None:
    """What the call must answer instead of its normal answer, or None.

    A matching scripted fault wins and is consumed; then the random draws, in the order
    throttle, server error, pending (202 only where `pending_allowed`).
    """
    for index, scripted in enumerate(faults.script):
        if isinstance(scripted, ScriptedFault) and scripted.matches(
            path, pending_allowed=pending_allowed
        ):
            del faults.script[index]
            return Drawn(scripted.status, scripted.answer_lost)
    if faults.throttle_rate and rng.random() < faults.throttle_rate:
        return Drawn(429)
    if faults.error_rate and rng.random() < faults.error_rate:
        return Drawn(rng.choice(_SERVER_ERRORS))
    if pending_allowed and faults.accepted_first_rate and rng.random() < faults.accepted_first_rate:
        return Drawn(PENDING)
    return None


def pick_hostile(faults: Faults, route: str, path: str) -> HostileFault | None:
    """The first hostile fault of the script that answers a call of `route` on `path`, or
    None; one of its `times` is used up (the fault leaves the script with the last)."""
    for index, scripted in enumerate(faults.script):
        if isinstance(scripted, ScriptedFault) or not scripted.matches(route, path):
            continue
        if scripted.times is None:
            return scripted
        if scripted.times == 1:
            del faults.script[index]
        else:
            faults.script[index] = dataclasses.replace(scripted, times=scripted.times - 1)
        return scripted
    return None
