"""One pass at a time through a dead-letter queue, for every operator and host at once.

A pass reads the queue by taking its messages and putting back those it keeps
(:mod:`worker.admin.deadletters`). Two passes at once would take each other's copies:
letters listed twice or missed, and a letter replayed by one pass replayed again by the
other once it failed again. So a pass holds the queue's lock while it goes through it:

- RabbitMQ: an exclusive, auto-deleted queue named after the dead-letter queue
  (``<queue>.lock``), declared on the pass's connection. While it exists, any other
  connection's declare is refused (``RESOURCE_LOCKED``), whatever host it comes from.
  The broker deletes it with the connection: at once when the process ends, however it
  ends, and within about two heartbeats when its host or network goes away.
- The embedded broker: an OS file lock on a file beside its SQLite file
  (``<broker file>.<queue>.lock``), which the OS releases when the process ends.

A command that finds the lock held says so once, then waits for it up to a bound, and
gives up with :class:`QueueBusy`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import filelock
from amqp.exceptions import ResourceLocked
from kombu import Connection

from worker.admin import UserError
from worker.broker.connection import embedded_path, is_amqp

LOCK_SUFFIX = ".lock"
POLL_S = 0.25  # how often a waiting command tries the lock again
UNSAFE_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9._-]")


class QueueBusy(UserError):
    """Raised when another command's pass held the queue for longer than this command
    would wait."""

    def __init__(self, queue: str, waited_s: float) -> None:
        super().__init__(
            f"another dlq command is still going through {queue} after {waited_s:g} s "
            "of waiting",
            "try again once it has finished, or wait longer with --lock-timeout",
        )


class PassLock(Protocol):
    """The lock of one dead-letter queue, tried without waiting."""

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False when another command holds it."""
        ...

    def release(self) -> None: ...


class BrokerQueueLock:
    """The lock as an exclusive, auto-deleted RabbitMQ queue on ``connection``."""

    def __init__(self, connection: Connection, name: str) -> None:
        self._connection = connection
        self.name = name
        self._channel: Any = None

    def try_acquire(self) -> bool:
        channel = self._connection.channel()
        try:
            channel.queue_declare(
                queue=self.name, durable=False, exclusive=True, auto_delete=True
            )
        except ResourceLocked:  # the broker closed the channel, not the connection
            return False
        self._channel = channel
        return True

    def release(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            channel.queue_delete(self.name)
            channel.close()


class FileQueueLock:
    """The lock as an OS lock on a file beside the embedded broker's SQLite file."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._lock = filelock.FileLock(path)

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        self._lock.release()


def pass_lock(connection: Connection, broker_url: str, queue: str) -> PassLock:
    """The lock of ``queue`` on the broker of ``broker_url`` (``connection`` is
    connected to it)."""
    if is_amqp(broker_url):
        return BrokerQueueLock(connection, queue + LOCK_SUFFIX)
    path = embedded_path(broker_url)
    if path is None:  # the settings check refuses any other broker first
        raise ValueError("the dead-letter queue's lock needs RabbitMQ or the embedded broker")
    return FileQueueLock(f"{path}.{UNSAFE_IN_FILE_NAMES.sub('_', queue)}{LOCK_SUFFIX}")


@contextmanager
def held(
    lock: PassLock,
    queue: str,
    wait_s: float,
    on_wait: Callable[[], None],
) -> Iterator[None]:
    """Hold ``lock`` inside: taken at once, or, after ``on_wait`` is called (once), when
    the other holder lets go within ``wait_s``; else :class:`QueueBusy`."""
    give_up = time.monotonic() + wait_s
    told = False
    while not lock.try_acquire():
        if time.monotonic() >= give_up:
            raise QueueBusy(queue, wait_s)
        if not told:
            on_wait()
            told = True
        time.sleep(POLL_S)
    try:
        yield
    finally:
        lock.release()
