"""Named sets of hostile faults, and the reading of `command-relay sandbox --hostile`.

A profile's faults answer every call they match, until the sandbox stops or its faults
are replaced (`PUT /_sandbox/faults`), so an operator can point a worker at it and watch.
Any other knob is a fault written as JSON (`--list-hostile` prints each profile's JSON, a
starting point to edit).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import get_args

from pydantic import TypeAdapter, ValidationError

from worker.sandbox.faults import ScriptEntry
from worker.sandbox.hostile import (
    RETRY_AFTER_VALUES,
    BadRetryAfter,
    BadToken,
    BadTokenShape,
    Drip,
    Echo,
    HostileFault,
    HugeHeaders,
    OddBody,
    PendingId,
    PendingIdForm,
    Redirect,
    Reset,
    ResetPoint,
)

_ENTRY: TypeAdapter[ScriptEntry] = TypeAdapter(ScriptEntry)
_ENTRIES: TypeAdapter[list[ScriptEntry]] = TypeAdapter(list[ScriptEntry])


@dataclass(frozen=True)
class Profile:
    """What a profile does, in a line, and its faults."""

    description: str
    faults: tuple[HostileFault, ...]


def _one(description: str, fault: HostileFault) -> Profile:
    return Profile(description, (fault,))


def _profiles() -> dict[str, Profile]:
    always = None  # every matching call
    profiles = {
        "redirect": _one(
            "API calls answer 302 to another host", Redirect(status=302, times=always)
        ),
        "redirect-control": _one(
            "API calls answer 307 (method kept) to the sandbox's own POST /_sandbox/reset",
            Redirect(status=307, location="/_sandbox/reset", times=always),
        ),
        "not-modified": _one(
            "API calls answer 304 Not Modified", Redirect(status=304, location=None, times=always)
        ),
        "drip-head": _one(
            "API answers (carried out) send status line and headers one byte a second",
            Drip(part="head", times=always),
        ),
        "drip-body": _one(
            "API answers (carried out) send their body one byte a second",
            Drip(part="body", times=always),
        ),
        "drip-token": _one(
            "token answers (a real grant) send their body one byte a second",
            Drip(route="token", part="body", times=always),
        ),
        "deep-objects": _one(
            "API calls answer 200 with JSON objects nested 100,000 deep",
            OddBody(shape="deep-objects", times=always),
        ),
        "deep-arrays": _one(
            "API calls answer 200 with JSON arrays nested 900 deep",
            OddBody(shape="deep-arrays", times=always),
        ),
        "invalid-json": _one(
            "API calls answer 200, application/json, with a body that is not JSON",
            OddBody(shape="invalid-json", times=always),
        ),
        "huge-body": _one(
            "API calls answer 200 with 16 MiB of JSON", OddBody(shape="huge", times=always)
        ),
        "html-body": _one(
            "API calls answer 200 with an HTML page", OddBody(shape="other-type", times=always)
        ),
        "echo": _one(
            "API calls answer 400 whose message echoes the request, Authorization included",
            Echo(times=always),
        ),
        "echo-success": _one(
            "API calls answer 200 whose body echoes the request, Authorization included",
            Echo(status=200, format="json", times=always),
        ),
        "echo-token": _one(
            "token calls answer 400 echoing the request: its form, password included",
            Echo(route="token", times=always),
        ),
        "huge-header": _one(
            "API answers (carried out) carry one 64 KiB header",
            HugeHeaders(shape="one-large", times=always),
        ),
        "many-headers": _one(
            "API answers (carried out) carry 2,000 headers",
            HugeHeaders(shape="many", times=always),
        ),
    }
    for at in get_args(ResetPoint):
        profiles[f"reset-{at}"] = _one(
            f"API calls are carried out, then their connection is reset {at.replace('-', ' ')}",
            Reset(at=at, times=always),
        )
    for form in get_args(PendingIdForm):
        profiles[f"pending-id-{form}"] = _one(
            f"ESET API calls answer 202 with a {form} response-id",
            PendingId(response_id=form, times=always),
        )
    for shape in get_args(BadTokenShape):
        profiles[f"bad-token-{shape}"] = _one(
            f"token calls answer a grant with: {shape}", BadToken(shape=shape, times=always)
        )
    for name, value in RETRY_AFTER_VALUES.items():
        profiles[f"retry-after-{name}"] = _one(
            f"API calls answer 429 with Retry-After: {value}",
            BadRetryAfter(value=value, times=always),
        )
    return profiles


PROFILES: Mapping[str, Profile] = MappingProxyType(_profiles())


def hostile_script(specs: Iterable[str]) -> list[ScriptEntry]:
    """The script `--hostile` values name, in order: each a profile name, a fault (or a
    list of faults) as JSON, or the path of a JSON file holding either.

    Raises ValueError saying which value is wrong and why.
    """
    script: list[ScriptEntry] = []
    for spec in specs:
        script += _entries(spec)
    return script


def describe(entry: ScriptEntry) -> str:
    """One script entry as JSON, as `--hostile` and `PUT /_sandbox/faults` take it."""
    return _ENTRY.dump_json(entry).decode()


def _entries(spec: str) -> list[ScriptEntry]:
    profile = PROFILES.get(spec)
    if profile is not None:
        return list(profile.faults)
    if spec.lstrip().startswith(("{", "[")):
        text = spec
    elif Path(spec).is_file():
        text = Path(spec).read_text(encoding="utf-8")
    else:
        raise ValueError(f"{spec!r} is neither a profile nor JSON nor a file")
    try:
        if text.lstrip().startswith("["):
            return _ENTRIES.validate_json(text)
        return [_ENTRY.validate_json(text)]
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}"
            for problem in error.errors(include_url=False)
        )
        raise ValueError(f"{spec[:60]!r} is not a fault: {problems}") from error
