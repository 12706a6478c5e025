"""``send --wait`` on RabbitMQ: a wait far longer than the broker's heartbeat timeout
keeps its connection (heartbeats flow) and gets its event; progress says a delayed
retry with its attempts, last error and next try; and a connection lost while waiting
is said as such, with where to look the result up, not as a broker to start."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from worker.broker.connection import connect
from worker.broker.topology import Topology
from worker.client import CommandClient
from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.settings import Settings

from ..command_line import cli_env, run_cli
from ..harness import RunningRelay, running_relay
from ..test_send_wait import progress_lines

pytestmark = pytest.mark.integration

HEARTBEAT_S = 1  # RabbitMQ drops a client silent for two of them: about 2 s
SLOW_VENDOR_MS = 7_000  # the wait: several times the broker's heartbeat timeout


class CuttableLink:
    """A TCP forwarder to the broker whose connections the test can cut, as a network
    failure would (the broker and its other clients are left alone)."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="link", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:  # closed
                return
            far = socket.create_connection(self._target)
            self._open += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def cut(self) -> None:
        for sock in self._open:
            with contextlib.suppress(OSError):  # closed already by the other side
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):  # cut
        while data := source.recv(65536):
            sink.sendall(data)


@pytest.fixture
def relay(sandbox: SandboxServer, amqp_url: str, redis_url: str) -> Iterator[RunningRelay]:
    """A worker on RabbitMQ and Redis: one delayed retry, 6 s later, after one attempt."""
    with running_relay(
        sandbox, broker_url=amqp_url, idempotency_url=redis_url, rate_limit_url=redis_url,
        retry_max_attempts=1, retry_delays_s=(6.0,),
    ) as running:
        yield running
    delete_topology(amqp_url, running.settings)


def delete_topology(amqp_url: str, settings: Settings) -> None:
    """Quorum queues are Raft clusters: leave none behind to slow the broker down."""
    with connect(amqp_url) as connection:
        channel = connection.channel()
        for queue in Topology.from_settings(settings).queues:
            channel.queue_delete(queue.name)
        for exchange in (settings.command_exchange, settings.event_exchange):
            channel.exchange_delete(exchange)


def test_a_wait_longer_than_the_brokers_heartbeat_timeout_gets_its_event(
    relay: RunningRelay, sandbox: SandboxServer
):
    """The vendor takes 7 s; the client asked for 1 s heartbeats, so RabbitMQ would
    have dropped a silent client after about 2 s, and its exclusive reply queue with it."""
    sandbox.state.faults = Faults(latency_ms=SLOW_VENDOR_MS)
    topology = Topology.from_settings(relay.settings)
    with CommandClient(relay.settings.broker_url, topology, heartbeat_s=HEARTBEAT_S) as client:
        message_id = client.publish({"type": "cancel-task", "params": {"task_id": 5150}},
                                    reply_to=client.reply_queue())
        events = (reply.event for reply in client.events(60)
                  if reply.correlation_id == message_id)
        event = next(events, None)
    assert event is not None, "no event: the client was dropped or timed out"
    assert event.data.outcome == "succeeded"
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"5150": 1}


def test_progress_says_a_delayed_retry_with_its_attempts_last_error_and_next_try(
    relay: RunningRelay, sandbox: SandboxServer, tmp_path: Path
):
    """fylr answers 503 once (after 3 s), the retry comes back 6 s later and succeeds."""
    sandbox.state.faults = Faults(latency_ms=3000,
                                  script=[ScriptedFault(status=503, path_contains="cancel")])
    done = run_cli("send", "cancel-task", "--params", '{"task_id": 5151}', "--wait",
                   "--timeout", "60", "--progress", env=cli_env(tmp_path, relay.settings))
    assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    replica = relay.service.owner
    first_try = f"claimed by {replica}; sent to the vendor"
    waiting = [line for line in lines if line.startswith("waiting for a delayed retry: ")]
    retried = (f"claimed by {replica}; sent to the vendor; tried again after 1 attempt "
               "(the last failed with vendor_unavailable)")
    assert first_try in lines and retried in lines and len(waiting) == 1, done.stderr
    assert lines.index(first_try) < lines.index(waiting[0]) < lines.index(retried)
    (said,) = waiting
    assert said.startswith("waiting for a delayed retry: 1 attempt so far, the last failed "
                           "with vendor_unavailable (fylr"), said
    assert "503" in said and "next try due at " in said and "(in " in said


def test_a_connection_lost_while_waiting_is_said_with_where_to_look_the_result_up(
    amqp_url: str, tmp_path: Path
):
    """No worker takes the command; the network between the client and the broker is
    cut while it waits."""
    parts = urlsplit(amqp_url)
    link = CuttableLink(parts.hostname or "localhost", parts.port or 5672)
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        broker_url=amqp_url, command_exchange=f"test.commands.{suffix}",
        command_queue=f"test.commands.{suffix}", event_exchange=f"test.events.{suffix}",
        dead_letter_queue=f"test.commands.dead.{suffix}",
        lane_queue_prefix=f"test.lane.{suffix}.",
    )
    linked_url = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:"
                                       f"{link.port}").geturl()
    env = cli_env(tmp_path, settings, RELAY_BROKER_URL=linked_url)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "send", "cancel-task", "--params",
             '{"task_id": 5152}', "--wait", "--timeout", "120"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        assert process.stderr is not None
        sent = process.stderr.readline()
        waiting = process.stderr.readline()
        assert waiting.startswith("waiting up to"), (sent, waiting)
        link.cut()
        out, rest = process.communicate(timeout=60)
    finally:
        link.close()
        delete_topology(amqp_url, settings)
    command_id = sent.split()[-1]
    assert process.returncode == 3, rest
    assert out == ""
    error, fix = rest.strip().splitlines()
    assert error.startswith("error: the connection to the broker at amqp://127.0.0.1:")
    assert "was lost while waiting for the result" in error
    assert f"command {command_id} was sent and may still be running" in error
    assert fix == f"fix: look its result up with: command-relay result {command_id}"
    assert "guest" not in rest and "start it" not in rest and "Traceback" not in rest
