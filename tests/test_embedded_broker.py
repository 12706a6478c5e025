"""The embedded broker keeps only what is queued or in flight: messages through its
transport, and commands through a worker on it, leave no rows behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Consumer, Producer, Queue

from worker.broker import embedded as embedded_broker
from worker.broker.connection import connect
from worker.broker.embedded_owners import DIRECTORY_SUFFIX as OWNERS_DIRECTORY_SUFFIX
from worker.broker.embedded_owners import TRACKED as owners_tracked
from worker.broker.topology import Topology
from worker.sandbox import SandboxServer

from .harness import embedded, running_relay
from .lanes import flood_and_quiet


def rows(path: Path) -> dict[str, list[int]]:
    """The visible flag of each stored message, by queue name."""
    with sqlite3.connect(path) as db:
        found: dict[str, list[int]] = {}
        for name, visible in db.execute(
            "SELECT q.name, m.visible FROM kombu_message m JOIN kombu_queue q"
            " ON q.id = m.queue_id ORDER BY m.id"
        ):
            found.setdefault(name, []).append(visible)
        return found


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    path = tmp_path / "broker.sqlite3"
    yield f"sqla+sqlite:///{path}", path


@pytest.fixture
def queue() -> Queue:
    return Queue(f"test.{uuid.uuid4().hex[:8]}", durable=True)


def publish(url: str, queue: Queue, *bodies: str) -> None:
    with connect(url) as connection:
        producer = Producer(connection.default_channel)
        for body in bodies:
            producer.publish(body, routing_key=queue.name, declare=[queue], retry=True)


def take(connection: Connection, queue: Queue, no_ack: bool = False) -> Any:
    return queue.bind(connection.default_channel).get(no_ack=no_ack)


def test_an_acked_message_is_deleted(broker: tuple[str, Path], queue: Queue):
    url, path = broker
    publish(url, queue, "one", "two")
    with connect(url) as connection:
        take(connection, queue).ack()
    assert rows(path) == {queue.name: [1]}  # "two", still queued


def test_a_rejected_message_is_deleted(broker: tuple[str, Path], queue: Queue):
    url, path = broker
    publish(url, queue, "one")
    with connect(url) as connection:
        take(connection, queue).reject()
    assert rows(path) == {}


def test_a_message_taken_without_ack_is_deleted(broker: tuple[str, Path], queue: Queue):
    url, path = broker
    publish(url, queue, "one")
    with connect(url) as connection:
        assert take(connection, queue, no_ack=True).body == b"one"
    assert rows(path) == {}


def test_a_message_consumed_without_ack_is_deleted(broker: tuple[str, Path], queue: Queue):
    url, path = broker
    publish(url, queue, "one")
    received: list[Any] = []
    with connect(url) as connection, Consumer(
        connection, [queue], on_message=received.append, no_ack=True
    ):
        connection.drain_events(timeout=5)
    assert [message.body for message in received] == [b"one"]
    assert rows(path) == {}


def test_a_taken_message_stays_in_the_table_until_it_is_settled(
    broker: tuple[str, Path], queue: Queue
):
    url, path = broker
    publish(url, queue, "one")
    with connect(url) as connection:
        message = take(connection, queue)
        assert rows(path) == {queue.name: [0]}  # in flight: invisible to other consumers
        message.ack()


def test_a_requeued_message_comes_back_first_in_its_queue_and_once(
    broker: tuple[str, Path], queue: Queue
):
    url, path = broker
    publish(url, queue, "one", "two")
    with connect(url) as connection:
        take(connection, queue).requeue()
        again = take(connection, queue)
        assert again.body == b"one"
        assert rows(path) == {queue.name: [0, 1]}
        again.ack()


def test_an_unacked_message_comes_back_once_when_its_connection_closes(
    broker: tuple[str, Path], queue: Queue
):
    url, path = broker
    publish(url, queue, "one")
    with connect(url) as connection:
        assert take(connection, queue).body == b"one"
    assert rows(path) == {queue.name: [1]}
    with connect(url) as connection:
        assert take(connection, queue).body == b"one"


def test_a_purge_leaves_messages_in_flight_to_their_consumer(
    broker: tuple[str, Path], queue: Queue
):
    url, path = broker
    publish(url, queue, "one", "two", "three")
    with connect(url) as connection:
        in_flight = take(connection, queue)
        assert connection.default_channel.queue_purge(queue.name) == 2
        assert rows(path) == {queue.name: [0]}
        in_flight.ack()
    assert rows(path) == {}


def test_a_deleted_queue_leaves_no_rows(broker: tuple[str, Path], queue: Queue):
    url, path = broker
    publish(url, queue, "one", "two")
    with connect(url) as connection:
        queue.bind(connection.default_channel).delete()
    assert rows(path) == {}
    with sqlite3.connect(path) as db:
        names = [name for (name,) in db.execute("SELECT name FROM kombu_queue")]
    assert queue.name not in names


def test_a_message_kombu_s_own_transport_stored_is_delivered_and_deleted(
    broker: tuple[str, Path], queue: Queue
):
    """The file is kombu's: one written by its SQLAlchemy transport (an older worker, a
    publisher using kombu directly) is read, and cleaned, by the worker's."""
    url, path = broker
    with Connection(url) as kombu_s_own:
        Producer(kombu_s_own.default_channel).publish(
            "from kombu", routing_key=queue.name, declare=[queue], retry=True
        )
    with connect(url) as connection:
        message = take(connection, queue)
        assert message.body == b"from kombu"
        message.ack()
    assert rows(path) == {}


def test_the_consumer_s_many_channels_share_a_few_database_connections(
    broker: tuple[str, Path]
):
    """kombu's transport gave each channel a session that kept a pooled connection: a
    16th channel waited for one (30 s), then failed. Here 200 consuming channels poll and
    take through the transport's one pool."""
    url, path = broker
    queues = [Queue(f"lane.{number}", durable=True) for number in range(200)]
    received: list[Any] = []
    with connect(url) as connection:
        consumers = [
            Consumer(connection.channel(), [queue], on_message=received.append)
            for queue in queues
        ]
        for consumer in consumers:
            consumer.consume()
        publish(url, queues[-1], "last lane")
        connection.drain_events(timeout=5)
        assert [message.body for message in received] == [b"last lane"]
        received[0].ack()
    assert rows(path) == {}


def test_commands_leave_only_the_dead_letters_in_the_broker_file(
    sandbox: SandboxServer, data_dir: Path
):
    """Commands through the command queue (fylr), through lanes (ESET accounts), replays
    and rejections: once their events are in and the worker has stopped, the only
    messages left are the rejected commands kept in the dead-letter queue."""
    settings = embedded(data_dir, **flood_and_quiet(sandbox))
    good = [
        {"type": "fetch-patching", "tenant": tenant, "params": {}} for tenant in ("flood", "quiet")
    ] * 5 + [
        {"type": "cancel-task", "tenant": "quiet", "params": {"task_id": 4711 + number}}
        for number in range(10)
    ]
    commands = [{**command, "id": str(uuid.uuid4())} for command in good]
    replays = [dict(command) for command in commands[:5]]  # the same id again
    rejected = [
        {"type": "cancel-task", "id": str(uuid.uuid4()), "params": {"task_id": "x"}}
        for _ in range(5)
    ]
    with running_relay(sandbox, **settings) as relay:
        for command in commands:
            relay.send(command)
        for command in replays + rejected:
            relay.send(command)
        outcomes = [event.data.outcome for event in relay.events(len(commands) + 10)]
        dead_letter_queue = Topology.from_settings(relay.settings).dead_letter_queue.name
    assert outcomes.count("rejected") == len(rejected)
    assert outcomes.count("succeeded") == len(commands) + len(replays)
    assert rows(data_dir / "broker.sqlite3") == {dead_letter_queue: [1] * len(rejected)}


@pytest.mark.parametrize("payload", ["not json", "[]", '{"properties": {}}', '{"body": 1}'])
def test_a_row_kombu_did_not_write_is_deleted_and_the_next_message_delivered(
    broker: tuple[str, Path], queue: Queue, payload: str
):
    """Nothing could ever deliver it: it must neither stop the consumer nor stay."""
    url, path = broker
    publish(url, queue, "first")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE kombu_message SET payload = ?", (payload,))
    publish(url, queue, "second")
    with connect(url) as connection:
        assert take(connection, queue) is None  # the broken one, dropped
        message = take(connection, queue)
        assert message.body == b"second"
        message.ack()
    assert rows(path) == {}


TAKE_AND_WAIT = """
import sys, time
from kombu import Queue
from worker.broker import embedded as embedded_broker
from worker.broker.connection import connect
from worker.broker.embedded_owners import DIRECTORY_SUFFIX as OWNERS_DIRECTORY_SUFFIX
from worker.broker.embedded_owners import TRACKED as owners_tracked
url, queue, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
connection = connect(url)
channel = connection.default_channel
taken = [Queue(queue, durable=True).bind(channel).get() for _ in range(count)]
print(" ".join(message.body.decode() for message in taken), flush=True)
time.sleep(600)
"""


@pytest.fixture
def killed_taker(broker: tuple[str, Path], queue: Queue) -> Iterator[Any]:
    """Runs a process that takes ``count`` messages of ``queue`` without settling them,
    and SIGKILLs it; returns what it had taken."""
    url, _ = broker
    processes: list[subprocess.Popen[str]] = []

    def take_then_die(count: int) -> list[str]:
        repository = Path(__file__).resolve().parents[1]
        process = subprocess.Popen(
            [sys.executable, "-c", TAKE_AND_WAIT, url, queue.name, str(count)],
            cwd=repository, env={**os.environ, "PYTHONPATH": str(repository)},
            stdout=subprocess.PIPE, text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        taken = process.stdout.readline().split()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return taken

    yield take_then_die
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.skipif(not owners_tracked, reason="no fcntl: a killed process keeps its messages")
def test_messages_a_killed_process_had_taken_come_back_first_when_the_next_connects(
    broker: tuple[str, Path], queue: Queue, killed_taker: Any
):
    url, path = broker
    publish(url, queue, "one", "two", "three")
    assert killed_taker(2) == ["one", "two"]
    assert rows(path) == {queue.name: [0, 0, 1]}
    with connect(url) as connection:
        messages = [take(connection, queue) for _ in range(3)]
        assert [message.body for message in messages] == [b"one", b"two", b"three"]
        for message in messages:
            message.ack()
    assert rows(path) == {}
    # Neither the killed process's lock file nor the last connection's is left behind.
    assert not list(path.with_name(path.name + OWNERS_DIRECTORY_SUFFIX).glob("*.lock"))


@pytest.mark.skipif(not owners_tracked, reason="no fcntl: a killed process keeps its messages")
def test_a_polling_consumer_gets_the_messages_of_a_process_killed_meanwhile(
    broker: tuple[str, Path], queue: Queue, killed_taker: Any, monkeypatch: pytest.MonkeyPatch
):
    """Another replica, consuming all along, looks for them as it polls (here on every
    poll rather than every half minute)."""
    url, _ = broker
    monkeypatch.setattr(embedded_broker, "RECOVER_EVERY_S", 0.0)
    publish(url, queue, "one")
    received: list[Any] = []
    with connect(url) as connection, Consumer(connection, [queue], on_message=received.append):
        assert killed_taker(1) == ["one"]
        connection.drain_events(timeout=10)
        assert [message.body for message in received] == [b"one"]
        received[0].ack()


def test_messages_a_live_connection_took_are_left_to_it(broker: tuple[str, Path], queue: Queue):
    url, path = broker
    publish(url, queue, "one")
    with connect(url) as holder:
        message = take(holder, queue)
        with connect(url) as other:
            assert take(other, queue) is None
        assert rows(path) == {queue.name: [0]}
        message.ack()


def test_connections_starting_together_on_a_new_file_all_declare_their_queues(tmp_path: Path):
    """A worker and its client (the demo) start on a file that does not exist yet: each
    lays out kombu's tables, and none fails for the other having done it meanwhile."""
    errors: list[BaseException] = []

    def declare(url: str, start: threading.Barrier) -> None:
        try:
            with connect(url) as connection:
                start.wait(10)
                Queue("shared", durable=True).bind(connection.default_channel).declare()
        except BaseException as error:
            errors.append(error)

    for attempt in range(10):
        url = f"sqla+sqlite:///{tmp_path / f'broker-{attempt}.sqlite3'}"
        start = threading.Barrier(4)
        threads = [threading.Thread(target=declare, args=(url, start)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []


LONE_SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=2048),
    header=st.text(st.characters() | LONE_SURROGATES, max_size=200),
    settle=st.sampled_from(["ack", "reject", "requeue then ack"]),
)
def test_any_message_comes_out_as_it_went_in_and_leaves_no_row(
    broker: tuple[str, Path], body: bytes, header: str, settle: str
):
    url, path = broker
    queue = Queue(f"fuzz.{uuid.uuid4().hex[:8]}", durable=True)
    with connect(url) as connection:
        Producer(connection.default_channel).publish(
            body, routing_key=queue.name, declare=[queue], headers={"x-any": header},
            content_type="application/octet-stream", content_encoding="binary",
        )
        message = take(connection, queue)
        # Headers go through JSON (kombu's), which reads a surrogate pair as the
        # character it encodes.
        assert (message.body, message.headers["x-any"]) == (body, json.loads(json.dumps(header)))
        if settle == "reject":
            message.reject()
        else:
            if settle == "requeue then ack":
                message.requeue()
                message = take(connection, queue)
            message.ack()
    assert queue.name not in rows(path)


BURST = 500


def test_a_burst_s_pages_go_back_to_the_file_system_while_the_consumer_polls(
    broker: tuple[str, Path], queue: Queue, monkeypatch: pytest.MonkeyPatch
):
    """Here on every poll rather than every ten seconds."""
    monkeypatch.setattr(embedded_broker, "RELEASE_EVERY_S", 0.0)
    url, path = broker
    publish(url, queue, *["x" * 8000] * BURST)
    burst_bytes = file_bytes(path)
    received: list[Any] = []
    with connect(url) as connection, Consumer(
        connection, [queue], on_message=lambda message: (message.ack(), received.append(1))
    ), contextlib.suppress(TimeoutError):
        while True:
            connection.drain_events(timeout=1)
    assert (len(received), rows(path)) == (BURST, {})
    print(f"\nbroker file bytes after a burst of {BURST} messages: {burst_bytes}, once they "
          f"were consumed: {file_bytes(path)}")
    assert file_bytes(path) < burst_bytes / 4


def file_bytes(path: Path) -> int:
    """The file's size once its write-ahead log is written back into it."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path.stat().st_size
