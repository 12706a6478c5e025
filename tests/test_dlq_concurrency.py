"""Two ``command-relay dlq`` commands at the same moment, with a worker running, on the
embedded broker (``tests/integration/test_dlq_concurrency_rabbitmq.py`` runs the same on
RabbitMQ): every pair of verbs lists each letter once, replays each once (vendor effects
counted at the sandbox), and loses none; and two replays of one letter call its vendor
once.

Every command here is a Spaaza task update (the sandbox counts each one as an effect on
the task) that fails as the vendor's 400 after the vendor acted (a ``ScriptedFault`` with
``answer_lost``): each vendor call shows in the sandbox's effects, and a replayed letter
comes back to the dead-letter queue while the other command runs, the hardest case for
it."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from worker.admin.deadletters import CLOCK_SKEW_S, DeadLetterQueue, Verdict
from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.settings import Settings

from .command_line import cli_env, json_lines, run_cli
from .harness import RunningRelay, embedded, running_relay
from .test_dlq import put_dead_letter

# Letters a pair of commands starts with: enough that two passes at once would overlap
# (a pass on the embedded broker takes about 25 ms a letter, on RabbitMQ a few), few
# enough to keep the tests short.
EMBEDDED_LETTERS = 20
SHOWN = 3  # ids a `dlq show` asks for
SPAAZA_UPDATE = "spaaza.update_task"
REPLAYED = re.compile(r"^replayed (\S+) ", re.MULTILINE)
PURGED = re.compile(r"^purged (\d+) message", re.MULTILINE)


@dataclass
class Letters:
    """The dead letters a test starts with: command id → the Spaaza task it updates."""

    tasks: dict[str, int]

    @property
    def ids(self) -> list[str]:
        return list(self.tasks)

    def shown(self) -> list[str]:
        """Ids a `dlq show` asks for: none that a purge in these tests drops."""
        kept = [command_id for command_id in self.ids if command_id not in self.purged()]
        return kept[:: max(len(kept) // SHOWN, 1)][:SHOWN]

    def purged(self) -> set[str]:
        """Ids a `dlq purge` of chosen letters drops: every other one."""
        return set(self.ids[::2])


# What each verb runs; "purge-all" is `dlq purge` without ids or filters.
VERBS: dict[str, Callable[[Letters], list[str]]] = {
    "list": lambda letters: ["dlq", "list", "--json"],
    "show": lambda letters: ["dlq", "show", *letters.shown()],
    "replay": lambda letters: ["dlq", "replay", "--all"],
    "purge": lambda letters: ["dlq", "purge", "--yes", *sorted(letters.purged())],
    "purge-all": lambda letters: ["dlq", "purge", "--yes"],
}
PAIRS = [
    *itertools.combinations_with_replacement(["list", "show", "replay", "purge"], 2),
    ("replay", "purge-all"),
    ("purge", "purge-all"),
]
# Every pair runs on RabbitMQ (tests/integration/test_dlq_concurrency_rabbitmq.py). The
# embedded broker differs only in its lock (a file lock, not a lock queue): these pairs,
# a read, a replay and a purge of everything each against its own kind, show it holds.
EMBEDDED_PAIRS = [("list", "list"), ("replay", "replay"), ("replay", "purge-all")]


@dataclass
class Done:
    """What two commands run together printed, and what it adds up to."""

    verbs: tuple[str, ...]
    runs: list[subprocess.CompletedProcess[str]]
    replayed: Counter[str] = field(default_factory=Counter)
    purged: int = 0

    def __post_init__(self) -> None:
        for run in self.runs:
            self.replayed.update(REPLAYED.findall(run.stdout))
            self.purged += sum(int(count) for count in PURGED.findall(run.stdout))

    def of(self, verb: str) -> list[subprocess.CompletedProcess[str]]:
        return [run for name, run in zip(self.verbs, self.runs, strict=True) if name == verb]


def failing_updates(sandbox: SandboxServer, count: int) -> None:
    """The next ``count`` Spaaza task updates act, then answer 400: each command fails,
    and is dead-lettered."""
    lost = ScriptedFault(status=400, path_contains="/spaaza/tasks/", answer_lost=True)
    sandbox.state.faults = Faults(script=[lost] * count)


def dead_letters(sandbox: SandboxServer, relay: RunningRelay, count: int) -> Letters:
    """``count`` commands the worker ran, failed and kept in the dead-letter queue; each
    replay of them fails again."""
    failing_updates(sandbox, 4 * count)
    run_id = uuid.uuid4().hex[:8]
    tasks = {f"c{number:03d}-{run_id}": 1000 + number for number in range(count)}
    once = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    for command_id, task in tasks.items():
        relay.send({"type": "update-triggers", "id": command_id, "params": {
            "provider": "spaaza", "task_id": task, "trigger": {"once": once},
        }})
    outcomes = Counter(event.data.outcome for event in relay.events(count))
    assert outcomes == {"failed": count}
    wait_for_count(relay.settings, count)
    return Letters(tasks)


def wait_for_count(settings: Settings, expected: int, timeout_s: float = 30) -> None:
    """Until the dead-letter queue holds ``expected`` messages (a copy the worker
    published may reach it just after the event it sent first)."""
    give_up = time.monotonic() + timeout_s
    with DeadLetterQueue(settings) as queue:
        while (count := queue.count()) != expected:
            assert time.monotonic() < give_up, f"{count} dead letters, not {expected}"
            time.sleep(0.05)


def queue_ids(settings: Settings) -> list[str]:
    """The command ids in the dead-letter queue, in order (read as `dlq list` does)."""
    with DeadLetterQueue(settings) as queue:
        return [letter.command_id for letter in queue.read()]


def effects(sandbox: SandboxServer, letters: Letters) -> dict[str, int]:
    """Vendor effects per command id: how many times its Spaaza task was updated."""
    updated = sandbox.state.stats()["effects"].get(SPAAZA_UPDATE, {})
    return {command_id: updated.get(str(task), 0) for command_id, task in letters.tasks.items()}


def run_together(
    env: dict[str, str], *commands: list[str]
) -> list[subprocess.CompletedProcess[str]]:
    """The command lines started at the same moment, each as its own process."""
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", *arguments], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arguments in commands
    ]
    done = []
    for process, arguments in zip(started, commands, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(arguments, process.returncode, stdout, stderr))
    return done


def shown_ids(stdout: str) -> list[str]:
    """The command ids of the letters `dlq show` printed (JSON documents, one after
    another)."""
    decoder, position, ids = json.JSONDecoder(), 0, []
    stdout = stdout.strip()
    while position < len(stdout):
        document, position = decoder.raw_decode(stdout, position)
        ids.append(document["command_id"])
        while position < len(stdout) and stdout[position].isspace():
            position += 1
    return ids


def settle(relay: RunningRelay, done: Done, letters: Letters) -> list[str]:
    """Once the worker has run every replayed command (each fails again and comes back),
    the dead-letter queue's ids."""
    if done.replayed:
        relay.events(sum(done.replayed.values()))
    wait_for_count(relay.settings, len(letters.ids) - done.purged)
    return queue_ids(relay.settings)


def two_verbs_at_once(
    sandbox: SandboxServer, relay: RunningRelay, data_dir: Path, verbs: tuple[str, str],
    count: int,
) -> None:
    """The scenario each pair runs on either broker: ``count`` dead letters, then the two
    commands at once; each letter listed and shown at most once, replayed at most once,
    purged at most once, and every other one still there once."""
    letters = dead_letters(sandbox, relay, count)
    env = cli_env(data_dir, relay.settings)
    done = Done(verbs, run_together(env, *(VERBS[verb](letters) for verb in verbs)))
    final = settle(relay, done, letters)

    for run in done.runs:
        assert "Traceback" not in run.stderr, run.stderr
    for run in done.of("list"):
        assert run.returncode == 0, run.stderr
        listed = [letter["command_id"] for letter in json_lines(run.stdout)]
        assert len(listed) == len(set(listed)), "a letter listed twice"
        assert set(listed) <= set(letters.ids)
    for run in done.of("show"):
        shown = shown_ids(run.stdout)
        assert len(shown) == len(set(shown)), "a letter shown twice"
        if "replay" in verbs:  # a replayed letter may not be back yet
            assert run.returncode in (0, 2) and set(shown) <= set(letters.shown()), run.stderr
        else:
            assert run.returncode == 0 and sorted(shown) == sorted(letters.shown()), run.stderr
    for run in done.of("replay") + done.of("purge") + done.of("purge-all"):
        assert run.returncode == 0, run.stderr

    assert [n for n in done.replayed.values() if n > 1] == [], "a letter replayed twice"
    assert effects(sandbox, letters) == {
        command_id: 1 + done.replayed[command_id] for command_id in letters.ids
    }, "vendor calls: one when it failed, one per replay"
    assert len(final) == len(set(final)), "a letter twice in the queue"
    targeted = set(letters.ids) if "purge-all" in verbs else (
        letters.purged() if "purge" in verbs else set()
    )
    assert set(letters.ids) - targeted <= set(final), "a letter lost"
    assert len(targeted - set(final)) == done.purged, "purged more or fewer than dropped"


@contextmanager
def embedded_relay(sandbox: SandboxServer, data_dir: Path) -> Iterator[RunningRelay]:
    with running_relay(sandbox, **embedded(data_dir)) as relay:
        yield relay


@pytest.mark.parametrize("verbs", EMBEDDED_PAIRS, ids="+".join)
def test_two_dlq_commands_at_once(
    sandbox: SandboxServer, tmp_path: Path, verbs: tuple[str, str]
) -> None:
    with embedded_relay(sandbox, tmp_path) as relay:
        two_verbs_at_once(sandbox, relay, tmp_path, verbs, EMBEDDED_LETTERS)


def two_replays_of_one_letter(sandbox: SandboxServer, relay: RunningRelay, data_dir: Path) -> None:
    """``dlq replay ID`` twice at once: one replays it, its vendor is called once more,
    and the letter (failed again) is back in the queue once."""
    letters = dead_letters(sandbox, relay, 3)
    target = letters.ids[1]
    env = cli_env(data_dir, relay.settings)
    done = Done(("replay", "replay"), run_together(env, *[["dlq", "replay", target]] * 2))
    final = settle(relay, done, letters)
    assert [run.returncode for run in done.runs] == [0, 0], [run.stderr for run in done.runs]
    assert done.replayed == {target: 1}
    assert effects(sandbox, letters) == {command_id: 1 + (command_id == target)
                                         for command_id in letters.ids}
    assert sorted(final) == sorted(letters.ids)


def test_two_replays_of_one_letter_call_its_vendor_once(sandbox: SandboxServer, tmp_path: Path):
    with embedded_relay(sandbox, tmp_path) as relay:
        two_replays_of_one_letter(sandbox, relay, tmp_path)


def copy_of_a_replayed_letter(sandbox: SandboxServer, relay: RunningRelay, data_dir: Path) -> None:
    """A letter replayed, failed again (and that failure purged), then back in the queue as
    it was (a pass that died between its replay and taking the original off): a second
    replay refuses it, as its key's outcome is no longer the one it was dead-lettered
    with, and calls no vendor."""
    letters = dead_letters(sandbox, relay, 1)
    (command_id,) = letters.ids
    env = cli_env(data_dir, relay.settings)
    with DeadLetterQueue(relay.settings) as queue:
        (original,) = queue.read()
    assert run_cli("dlq", "replay", command_id, env=env).returncode == 0
    (event,) = relay.events(1)
    assert event.data.outcome == "failed"
    wait_for_count(relay.settings, 1)
    assert run_cli("dlq", "purge", "--yes", env=env).returncode == 0
    put_dead_letter(relay.settings, json.loads(original.body), original.headers)

    again = run_cli("dlq", "replay", "--all", env=env)
    assert again.returncode == 1, again.stderr
    assert f"refused {command_id}: " in again.stdout and "replayed already" in again.stdout
    assert effects(sandbox, letters) == {command_id: 2}, "the failure and the one replay"
    assert queue_ids(relay.settings) == [command_id]


def test_a_copy_of_a_replayed_letter_is_refused(sandbox: SandboxServer, tmp_path: Path):
    with embedded_relay(sandbox, tmp_path) as relay:
        copy_of_a_replayed_letter(sandbox, relay, tmp_path)


def a_second_command_waits_for_the_first(settings: Settings, data_dir: Path) -> None:
    """While a pass holds the queue, a command says that it waits; it goes through the
    queue once the pass ends."""
    put_dead_letter(settings, {"type": "cancel-task", "id": "waits-1", "params": {"task_id": 1}},
                    {"x-relay-error-code": "vendor_rejected"})
    env = cli_env(data_dir, settings)
    with DeadLetterQueue(settings) as queue, queue.exclusive():
        waiting = subprocess.Popen(
            [sys.executable, "-m", "worker", "dlq", "list", "--json"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert waiting.stderr is not None
        said = waiting.stderr.readline()
    stdout, stderr = waiting.communicate(timeout=60)
    assert said.startswith("waiting for another dlq command to finish with "), said + stderr
    assert waiting.returncode == 0, stderr
    assert [letter["command_id"] for letter in json_lines(stdout)] == ["waits-1"]


def test_a_second_command_waits_for_the_first(tmp_path: Path):
    a_second_command_waits_for_the_first(Settings(**embedded(tmp_path)), tmp_path)


def a_command_gives_up_waiting(settings: Settings, data_dir: Path) -> None:
    """A pass that holds the queue longer than ``--lock-timeout``: the command exits 2,
    saying what holds it up and what to do."""
    env = cli_env(data_dir, settings)
    with DeadLetterQueue(settings) as queue, queue.exclusive():
        done = run_cli("dlq", "replay", "--all", "--lock-timeout", "0.5s", env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"waiting for another dlq command to finish with {queue.name}… (at most 0.5s)",
        f"error: another dlq command is still going through {queue.name} after 0.5 s of "
        "waiting",
        "fix: try again once it has finished, or wait longer with --lock-timeout",
    ]


def test_a_command_gives_up_waiting_after_its_lock_timeout(tmp_path: Path):
    a_command_gives_up_waiting(Settings(**embedded(tmp_path)), tmp_path)


HOLDER = """
import time
from worker.admin.deadletters import DeadLetterQueue
from worker.settings import Settings

with DeadLetterQueue(Settings()) as queue, queue.exclusive():
    print("holding", flush=True)
    time.sleep(600)
"""


def the_lock_of_a_killed_command_goes_with_it(settings: Settings, data_dir: Path) -> None:
    """A command killed in the middle of its pass (SIGKILL: nothing of it runs again)
    holds up no other: the lock goes with its process."""
    env = cli_env(data_dir, settings)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        held = run_cli("dlq", "list", "--lock-timeout", "0.5s", env=env)
        assert held.returncode == 2, held.stderr
        holder.kill()
        holder.wait(timeout=30)
        done = run_cli("dlq", "list", "--lock-timeout", "30s", env=env)
        assert done.returncode == 0, done.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_lock_of_a_killed_command_goes_with_it(tmp_path: Path):
    the_lock_of_a_killed_command_goes_with_it(Settings(**embedded(tmp_path)), tmp_path)


def test_a_letter_whose_outcome_the_store_forgot_is_replayed(
    sandbox: SandboxServer, tmp_path: Path
):
    """The store's retention ran out for the outcome a letter names: nothing is released,
    and the letter is replayed (the worker still runs its key once)."""
    with embedded_relay(sandbox, tmp_path) as relay:
        command = {"type": "cancel-task", "id": f"forgotten-{uuid.uuid4().hex[:8]}",
                   "params": {"task_id": 77}}
        put_dead_letter(relay.settings, command, {
            "x-relay-reason": "failed", "x-relay-error-code": "vendor_rejected",
            "x-relay-event-id": str(uuid.uuid4()), "x-relay-dead-lettered-at": time.time() - 60,
        }, reply_to=relay.reply_to)
        done = run_cli("dlq", "replay", command["id"], env=cli_env(tmp_path, relay.settings))
        assert done.returncode == 0 and f"replayed {command['id']}" in done.stdout, done.stderr
        (event,) = relay.events(1)
        assert (event.data.command_id, event.data.outcome) == (command["id"], "succeeded")
        assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"77": 1}


STAMPS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(), st.text(max_size=30),
    st.floats(min_value=-600, max_value=600).map(lambda offset_s: time.time() + offset_s),
)


@examples(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stamp=STAMPS)
def test_no_dead_lettered_at_a_publisher_wrote_keeps_a_letter_from_a_purge(
    tmp_path: Path, stamp: Any
):
    """A letter the broker dead-lettered keeps the command's headers, whatever the
    publisher wrote in them: a pass that acts only on letters older than itself reads
    such a time without failing, and leaves the letter alone only for a time it may be
    true for (since the pass began, and not beyond the clocks' allowed skew)."""
    settings = Settings(**embedded(tmp_path))
    put_dead_letter(settings, {"type": "cancel-task", "id": "stamped", "params": {"task_id": 1}},
                    {"x-relay-dead-lettered-at": stamp})
    began = datetime.now(UTC)
    with DeadLetterQueue(settings) as queue:
        report = queue.walk(lambda letter: Verdict.DROP, since=began)
        ahead_s = time.time() + CLOCK_SKEW_S
        left = queue.read()
        queue.walk(lambda letter: Verdict.DROP)  # empty for the next example
    assert report.seen == 1
    if left:
        assert isinstance(stamp, int | float) and not isinstance(stamp, bool)
        assert began.timestamp() <= stamp <= ahead_s
