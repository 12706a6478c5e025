"""Chaos: a stream of ordinary commands with poison messages among them.

No message a publisher can send may end a replica: the poison (malformed bodies, lone
surrogates, junk delivery headers, non-UTF-8 id properties, a ``reply_to`` naming the
command queue; see ``poison.py``) is answered with one event each, ``rejected`` where it
is not a valid command, and kept in the dead-letter queue, while every ordinary command
around it is done exactly once and nothing of it is dead-lettered.

    pytest -q -s -rA -m chaos tests/chaos/test_chaos_poison.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.rig.events import EventCollector, SeenEvent

from .conftest import Report
from .embedded import EmbeddedRig
from .figures import EFFECT_ROUTE, Figures, Workload, batch_deletes
from .poison import DeadLetter, Poison, events_of, interleave, judge, poison_messages
from .rig import ChaosRig

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SCALE = float(os.environ.get("CHAOS_SCALE", "1"))
KEYS = max(50, int(270 * SCALE))  # with 10% sent twice: ~300 ordinary commands
DUPLICATE_SHARE = 0.1
DEADLINE_S = 180.0
LEASE_S = 3.0  # a replica the poison kills leaves claims behind: taken over within the run
ANSWER_TIMEOUT_S = 90.0


@pytest.fixture
def embedded_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedRig]:
    rig = EmbeddedRig(request.node.name.removeprefix("test_"), tmp_path)
    try:
        yield rig
    finally:
        rig.close()


@pytest.mark.timeout(180)
def test_poison_stream_on_rabbitmq(rig: ChaosRig, report: Report):
    """3 replicas on RabbitMQ; ~300 batch deletes with ~65 poison messages among them."""
    rig.start(replicas=3, claim_lease_s=LEASE_S)
    reply_to = rig.observe_replies()
    workload, poisons = stream(reply_to, rig.names.command_queue, amqp=True)
    rig.publish_items(interleave(workload.commands, poisons))
    assert rig.collector is not None and rig.replies is not None
    collector, replies = rig.collector, rig.replies
    total = len(workload.commands)

    def done() -> bool:
        return rig.answered(workload) == total and all_answered(
            poisons, replies.by_correlation(), collector.by_command()
        )

    rig.run_until(done, timeout_s=ANSWER_TIMEOUT_S)
    figures = rig.finish(workload)
    letters = [
        DeadLetter(properties.message_id, properties.correlation_id, body)
        for properties, body in rig.admin.drain(rig.names.dead_letter_queue)
    ]
    assert rig.sandbox is not None
    effects = rig.sandbox.stats()["effects"].get(EFFECT_ROUTE, {})
    problems = verdict(figures, workload, poisons, replies, collector, letters, effects)
    report(figures)
    assert not problems, f"{'; '.join(problems)}\n{figures.summary()}\n{rig.diagnostics()}"


@pytest.mark.timeout(180)
def test_poison_stream_on_the_embedded_broker(embedded_rig: EmbeddedRig, report: Report):
    """2 replicas sharing the embedded broker's SQLite files; the same stream, without
    the poison only AMQP can carry or show (non-UTF-8 id properties, reply_to)."""
    rig = embedded_rig
    rig.start(replicas=2, claim_lease_s=LEASE_S)
    workload, poisons = stream(rig.names.replies, rig.names.command_queue, amqp=False)
    rig.publish_items(interleave(workload.commands, poisons))
    assert rig.collector is not None
    collector = rig.collector
    total = len(workload.commands)

    def done() -> bool:
        return rig.answered(workload) == total and all_answered(
            poisons, collector.by_correlation(), collector.by_command()
        )

    rig.run_until(done, timeout_s=ANSWER_TIMEOUT_S)
    figures = rig.finish(workload)
    assert rig.sandbox is not None
    effects = rig.sandbox.stats()["effects"].get(EFFECT_ROUTE, {})
    letters = rig.dead_letters()
    problems = verdict(figures, workload, poisons, collector, collector, letters, effects)
    report(figures)
    assert not problems, f"{'; '.join(problems)}\n{figures.summary()}\n{rig.diagnostics()}"


def stream(reply_to: str, command_queue: str, *, amqp: bool) -> tuple[Workload, list[Poison]]:
    workload = batch_deletes(KEYS, duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S)
    deadline = (datetime.now(UTC) + timedelta(seconds=DEADLINE_S)).isoformat()
    poisons = poison_messages(reply_to=reply_to, command_queue=command_queue, deadline=deadline)
    return workload, [p for p in poisons if amqp or not p.amqp_only]


def all_answered(
    poisons: list[Poison],
    by_correlation: dict[str, list[SeenEvent]],
    by_command: dict[str, list[SeenEvent]],
) -> bool:
    return all(events_of(poison, by_correlation, by_command) for poison in poisons)


def verdict(
    figures: Figures,
    workload: Workload,
    poisons: list[Poison],
    replies: EventCollector,
    events: EventCollector,
    letters: list[DeadLetter],
    effects: dict[str, int],
) -> list[str]:
    """Every requirement broken, for the ordinary commands and the poison alike; the
    poison's figures go into ``figures.extra``."""
    judged = judge(
        poisons,
        replies.by_correlation(),
        events.by_command(),
        letters,
        set(workload.command_ids),
    )
    figures.extra.update(judged.figures)
    problems = figures.problems(all_succeed=True)  # lost, replays, executed twice
    if figures.commands_with_repeated_events:
        problems.append(
            f"{figures.commands_with_repeated_events} ordinary commands with several events"
        )
    if figures.keys_with_multiple_effects:
        problems.append(f"{figures.keys_with_multiple_effects} keys with two vendor effects")
    applied_twice = [p.kind for p in poisons if p.object_uuid and effects.get(p.object_uuid, 0) > 1]
    if applied_twice:
        problems.append(f"poison commands applied twice: {applied_twice}")
    problems.extend(judged.problems)
    crashes = figures.extra["crashes"]
    if crashes:
        problems.insert(0, f"{crashes} replica crashes")
    if set(figures.extra["exit_codes_at_end"]) != {0}:
        problems.append(f"replicas did not stop cleanly: {figures.extra['exit_codes_at_end']}")
    return problems
