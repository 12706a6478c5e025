"""What a scenario sends, and the figures it reports from what came back.

Every command is a ``batch-delete`` of one object uuid of its own under an idempotency key
of its own, so the sandbox's effect count per object is the effect count per key. A share
of the keys is sent twice (same key and payload, another command id): the second copy
must be answered from the stored result, marked ``replayed``, without a vendor call.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.rig.events import SeenEvent

EFFECT_ROUTE = "eset.batch_delete"


@dataclass(frozen=True)
class Workload:
    commands: list[dict[str, Any]]  # in publishing order
    object_by_key: dict[str, str]  # the vendor resource each key acts on
    # The sandbox route whose effects count for a key, where it is not EFFECT_ROUTE; None:
    # a read, which has no effect.
    route_by_key: dict[str, str | None] = field(default_factory=dict)

    @property
    def command_ids(self) -> list[str]:
        return [command["id"] for command in self.commands]

    @property
    def duplicates(self) -> int:
        return len(self.commands) - len(self.object_by_key)

    def route(self, key: str) -> str | None:
        return self.route_by_key.get(key, EFFECT_ROUTE)

    def __add__(self, other: Workload) -> Workload:
        """Both workloads' commands (these first) as one, for the figures."""
        return Workload(
            self.commands + other.commands,
            {**self.object_by_key, **other.object_by_key},
            {**self.route_by_key, **other.route_by_key},
        )


def batch_deletes(
    keys: int,
    *,
    duplicate_share: float,
    deadline_s: float,
    seed: int | None = None,
    tenant: str = "default",
) -> Workload:
    """``keys`` commands plus ``duplicate_share`` of them sent again, later in the stream
    (anywhere from right after the original, while it may still be in flight, to the end)."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    deadline = (datetime.now(UTC) + timedelta(seconds=deadline_s)).isoformat()
    placed: list[tuple[float, dict[str, Any]]] = []
    object_by_key: dict[str, str] = {}
    for index in range(keys):
        key = f"chaos-{run}-{index}"
        object_uuid = str(uuid.uuid4())
        object_by_key[key] = object_uuid
        command = {
            "type": "batch-delete",
            "id": str(uuid.uuid4()),
            "idempotency_key": key,
            "tenant": tenant,
            "deadline": deadline,
            "params": {"object_uuids": [object_uuid]},
        }
        placed.append((index, command))
        if rng.random() < duplicate_share:
            placed.append((rng.uniform(index, keys), {**command, "id": str(uuid.uuid4())}))
    placed.sort(key=lambda item: item[0])
    return Workload([command for _, command in placed], object_by_key)


@dataclass
class Figures:
    """One scenario's result; ``problems`` lists what broke the requirements."""

    scenario: str
    commands_sent: int
    duplicates_sent: int
    terminal: int  # commands with at least one event
    without_terminal: int
    events: int
    commands_with_repeated_events: int  # redelivered after the event went out: a replay
    keys_with_multiple_effects: int
    keys_executed_twice: int  # keys with more than one non-replayed event
    duplicates_replayed: int  # duplicate commands answered by a replayed event
    succeeded_without_effect: int
    outcomes: dict[str, int]  # outcome (and error code) of each command's first event
    vendor_calls: int
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def problems(self, *, all_succeed: bool = False) -> list[str]:
        """Broken requirements, except double effects (checked on their own)."""
        found = []
        if self.without_terminal:
            found.append(f"{self.without_terminal} commands without a terminal event")
        if self.keys_executed_twice:
            found.append(f"{self.keys_executed_twice} keys executed (not replayed) twice")
        if self.duplicates_replayed < self.duplicates_sent:
            found.append(
                f"only {self.duplicates_replayed} of {self.duplicates_sent} duplicates replayed"
            )
        if self.succeeded_without_effect:
            found.append(f"{self.succeeded_without_effect} succeeded keys without an effect")
        others = {k: n for k, n in self.outcomes.items() if k != "succeeded"}
        if all_succeed and others:
            found.append(f"not all succeeded: {others}")
        return found

    def summary(self) -> str:
        extra = " ".join(f"{k}={_short(v)}" for k, v in self.extra.items())
        return (
            f"[chaos] {self.scenario}: sent={self.commands_sent} "
            f"(duplicates={self.duplicates_sent}) terminal={self.terminal} "
            f"without_terminal={self.without_terminal} "
            f"keys_multi_effect={self.keys_with_multiple_effects} "
            f"executed_twice={self.keys_executed_twice} "
            f"duplicates_replayed={self.duplicates_replayed} events={self.events} "
            f"repeated={self.commands_with_repeated_events} outcomes={self.outcomes} "
            f"vendor_calls={self.vendor_calls} duration={self.duration_s:.1f}s {extra}"
        ).rstrip()

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def compute(
    scenario: str,
    workload: Workload,
    events: dict[str, list[SeenEvent]],
    sandbox_stats: dict[str, Any],
    duration_s: float,
) -> Figures:
    effects_by_route: dict[str, dict[str, int]] = sandbox_stats.get("effects", {})

    def effects(key: str) -> int:
        """How often the vendor applied ``key``'s effect (0 for a read)."""
        route = workload.route(key)
        if route is None:
            return 0
        return effects_by_route.get(route, {}).get(workload.object_by_key[key], 0)

    ids = workload.command_ids
    answered = [command_id for command_id in ids if events.get(command_id)]

    commands_by_key: dict[str, list[str]] = {}
    for command in workload.commands:
        commands_by_key.setdefault(command["idempotency_key"], []).append(command["id"])

    outcomes: Counter[str] = Counter()
    for command_id in answered:
        first = events[command_id][0]
        outcomes[first.outcome + (f":{first.error_code}" if first.error_code else "")] += 1

    executed_twice = duplicates_replayed = succeeded_without_effect = 0
    for key, command_ids in commands_by_key.items():
        key_events = [seen for command_id in command_ids for seen in events.get(command_id, [])]
        originals = [seen for seen in key_events if not seen.replayed]
        if len(originals) > 1:
            executed_twice += 1
        only_replayed = sum(
            1
            for command_id in command_ids
            if events.get(command_id) and all(seen.replayed for seen in events[command_id])
        )
        # Of n commands of a key, n - 1 are duplicates; a replayed original (its event
        # published again after a crash) does not count for a duplicate.
        duplicates_replayed += min(only_replayed, len(command_ids) - 1)
        succeeded = any(seen.outcome == "succeeded" for seen in key_events)
        if succeeded and workload.route(key) is not None and effects(key) == 0:
            succeeded_without_effect += 1

    figures = Figures(
        scenario=scenario,
        commands_sent=len(ids),
        duplicates_sent=workload.duplicates,
        terminal=len(answered),
        without_terminal=len(ids) - len(answered),
        events=sum(len(events.get(command_id, [])) for command_id in ids),
        commands_with_repeated_events=sum(
            1 for command_id in answered if len(events[command_id]) > 1
        ),
        keys_with_multiple_effects=sum(1 for key in workload.object_by_key if effects(key) > 1),
        keys_executed_twice=executed_twice,
        duplicates_replayed=duplicates_replayed,
        succeeded_without_effect=succeeded_without_effect,
        outcomes=dict(sorted(outcomes.items())),
        vendor_calls=int(sandbox_stats.get("calls", {}).get(EFFECT_ROUTE, 0)),
        duration_s=duration_s,
    )
    # What the events of a few doubly applied keys said, to tell how it happened.
    sample = [
        {
            "key": key,
            "effects": effects(key),
            "events": [
                {
                    "command": seen.command_id[:8],
                    "outcome": seen.outcome,
                    "replayed": seen.replayed,
                    "attempts": seen.attempts,
                    "response_id": seen.response_id,
                }
                for command_id in command_ids
                for seen in events.get(command_id, [])
            ],
        }
        for key, command_ids in commands_by_key.items()
        if effects(key) > 1
    ][:3]
    if sample:
        figures.extra["multi_effect_sample"] = sample
    # A few commands without a terminal event, to look them up in the replicas' logs.
    unanswered = [
        {"command": command["id"], "key": command.get("idempotency_key"), "type": command["type"]}
        for command in workload.commands
        if not events.get(command["id"])
    ][:3]
    if unanswered:
        figures.extra["without_terminal_sample"] = unanswered
    return figures

