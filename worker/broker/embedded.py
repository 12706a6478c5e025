"""The embedded broker: kombu's SQLAlchemy transport over one SQLite file, holding only
what is queued or in flight, with any number of channels.

kombu's own transport (``kombu/transport/sqlalchemy``) keeps every message it hands out:
taking one marks its row invisible, acking it forgets it in memory only, and a requeued
or restored message is written again as a new row, the old one staying behind. Each of
its channels has an ORM session that keeps a pooled connection checked out between calls
(declaring a queue leaves a transaction open), and all the connections of a process share
one engine with SQLAlchemy's pool of 5 + 10: a worker with 15 lanes (16 channels) waits
for a connection that never comes back, then reconnects, again and again. Its poll takes
a write lock for every consumed queue, a hundred lanes a hundred times per poll.

:class:`EmbeddedTransport` keeps kombu's tables (either transport reads a file of the
other) and changes how they are used:

- A message taken is marked invisible; acked or rejected, its row is deleted. Requeued
  (a reject with requeue, or the unacked ones restored when a channel closes) the same
  row becomes visible again, first in its queue, as RabbitMQ puts a requeued message
  back at its place.
- Every call checks a connection out of the transport's own engine for one statement or
  one transaction, and gives it back: idle channels hold none, so the number of channels
  (lanes) is not bounded by the pool, only by kombu's channel ids (65535).
- A poll asks once which of the consumed queues have a message ready, and takes from
  those only: the cost of an idle poll hardly grows with the lanes.
- A queue deleted (a client's reply queue) loses its row and its messages.
- The file keeps a write-ahead log (the poll and other readers never wait for a
  publish), synced at every commit as before, so a message stored survives a crash of
  the machine too. A file this transport creates gives free pages back once more than
  half of it is free (after a burst).

Durability: a message is deleted only when acked or rejected by the connection that
took it; while the process runs, an unacked message goes back to its queue when its
channel closes (a lost connection, a shutdown). A message taken is marked with its
connection (the column ``relay_owner``, added to kombu's table), which holds a lock for
as long as it lives (``worker/broker/embedded_owners.py``); the messages of a
connection that is gone without settling them (a process killed, SIGKILL included) are
made visible again by the next connection to the file, when it connects and every
:data:`RECOVER_EVERY_S` while it polls. (kombu's transport never delivered those
again; a message it took, or one taken where ``fcntl`` is missing, still is not.)
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from json import dumps, loads
from pathlib import Path
from queue import Empty
from typing import Any

from kombu import Connection as KombuConnection
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.transport.sqlalchemy.models import metadata
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import QueuePool

from worker.broker.embedded_owners import Owners

log = logging.getLogger(__name__)

# Connections one transport may hold at once: each call holds one, briefly, and a kombu
# connection is used by one thread at a time; the spare ones serve the odd second thread
# (channels closed by the garbage collector at exit).
POOL_SIZE = 1
POOL_OVERFLOW = 4
RELEASE_EVERY_S = 10.0  # how often the free pages are counted (while polling)
RELEASE_PAGES = 1024  # free pages given back per release, at most (4 MiB)
MAX_WAL_BYTES = 16 * 1024 * 1024  # the write-ahead log is cut back to this after a checkpoint
BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another writer (pysqlite's default)
WAL_SWITCH_WAIT_S = BUSY_TIMEOUT_MS / 1000  # as long as a statement waits
WAL_SWITCH_RETRY_S = 0.01
READY_INDEX = "ix_relay_message_ready"
OWNER_COLUMN = "relay_owner"  # which connection took a message (worker/broker/embedded_owners.py)
RECOVER_EVERY_S = 30.0  # how often messages of connections that are gone are looked for
URL_PREFIX = "sqla+"  # kombu's name for its SQLAlchemy transport, before the engine's URL


def embedded_connection(url: str, poll_interval_s: float) -> KombuConnection:
    """A kombu connection (not yet connected) of :class:`EmbeddedTransport` to the broker
    of ``url`` (``sqla+sqlite:///PATH``), polling every ``poll_interval_s``."""
    # kombu would take the transport named by the URL's prefix over the one given.
    return KombuConnection(
        url.removeprefix(URL_PREFIX),
        transport=EmbeddedTransport,
        transport_options={"polling_interval": poll_interval_s},
    )


class Messages:
    """kombu's two tables, ``kombu_queue`` and ``kombu_message``, through one engine."""

    def __init__(self, url: str) -> None:
        self._engine = _engine(url)
        database = self._engine.url.database
        self._owners = Owners.of(Path(database) if database else None)
        self._me = None if self._owners is None else self._owners.me

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self._engine.connect() as connection:
            yield connection

    def _transaction(self) -> contextlib.AbstractContextManager[Connection]:
        return _transaction(self._engine)

    def create_queue(self, queue: str) -> None:
        with self._connection() as connection:
            # Looked for first: a declare of a queue that exists (every lane, each time
            # its backlog is asked for) takes no write lock.
            if connection.exec_driver_sql(
                "SELECT 1 FROM kombu_queue WHERE name = ?", (queue,)
            ).first() is None:
                connection.exec_driver_sql(
                    "INSERT OR IGNORE INTO kombu_queue (name) VALUES (?)", (queue,)
                )

    def put(self, queue: str, payload: str) -> None:
        """Store a message at the end of ``queue`` (created if need be)."""
        with self._transaction() as connection:
            connection.exec_driver_sql(
                "INSERT OR IGNORE INTO kombu_queue (name) VALUES (?)", (queue,)
            )
            connection.exec_driver_sql(
                "INSERT INTO kombu_message (queue_id, visible, timestamp, payload, version)"
                " SELECT id, 1, NULL, ?, 1 FROM kombu_queue WHERE name = ?",
                (payload, queue),
            )

    def take(self, queue: str, keep: bool = True) -> tuple[int, str] | None:
        """The first visible message of ``queue`` (its row id and payload), now invisible
        and this connection's (``keep``) or deleted; None when there is none."""
        if keep and self._owners is not None:
            self._owners.hold()  # before the first message is ours
        with self._transaction() as connection:
            row = connection.exec_driver_sql(
                "SELECT id, payload FROM kombu_message WHERE queue_id ="
                " (SELECT id FROM kombu_queue WHERE name = ?) AND visible = 1"
                " ORDER BY id LIMIT 1",
                (queue,),
            ).first()
            if row is None:
                return None
            if keep:  # with its taker, and the time taken (the column kombu sets then)
                connection.exec_driver_sql(
                    "UPDATE kombu_message SET visible = 0, timestamp = CURRENT_TIMESTAMP,"
                    f" {OWNER_COLUMN} = ? WHERE id = ?",
                    (self._me, row[0]),
                )
            else:
                connection.exec_driver_sql("DELETE FROM kombu_message WHERE id = ?", (row[0],))
        return int(row[0]), str(row[1])

    def delete(self, row_id: int) -> None:
        with self._connection() as connection:
            connection.exec_driver_sql("DELETE FROM kombu_message WHERE id = ?", (row_id,))

    def restore(self, row_id: int) -> None:
        """Make a taken message visible again, at its place in its queue."""
        with self._connection() as connection:
            connection.exec_driver_sql(
                f"UPDATE kombu_message SET visible = 1, timestamp = NULL, {OWNER_COLUMN} = NULL"
                " WHERE id = ?",
                (row_id,),
            )

    def recover(self) -> None:
        """Make visible again the messages taken by connections that are gone (a killed
        process) without settling them."""
        if self._owners is None:
            return
        with self._connection() as connection:
            known = {
                str(owner) for (owner,) in connection.exec_driver_sql(
                    f"SELECT DISTINCT {OWNER_COLUMN} FROM kombu_message"
                    f" WHERE visible = 0 AND {OWNER_COLUMN} IS NOT NULL"
                )
            }
            for owner in self._owners.gone(known):
                restored = connection.exec_driver_sql(
                    f"UPDATE kombu_message SET visible = 1, timestamp = NULL, {OWNER_COLUMN} ="
                    f" NULL WHERE {OWNER_COLUMN} = ? AND visible = 0",
                    (owner,),
                ).rowcount
                if restored:
                    log.warning(
                        "%d messages taken by a connection that ended without settling them"
                        " (a process killed) are back in their queues", restored,
                    )

    def ready(self) -> set[str]:
        """The queues that have a visible message (one index lookup per queue)."""
        with self._connection() as connection:
            rows = connection.exec_driver_sql(
                "SELECT name FROM kombu_queue q WHERE EXISTS (SELECT 1 FROM kombu_message m"
                " WHERE m.queue_id = q.id AND m.visible = 1)"
            )
            return {str(name) for (name,) in rows}

    def size(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not those taken and not yet settled)."""
        with self._connection() as connection:
            count = connection.exec_driver_sql(
                "SELECT count(*) FROM kombu_message WHERE queue_id ="
                " (SELECT id FROM kombu_queue WHERE name = ?) AND visible = 1",
                (queue,),
            ).scalar()
        return int(count or 0)

    def purge(self, queue: str) -> int:
        """Delete the messages waiting in ``queue`` (those taken are left to their
        consumer, as RabbitMQ does); how many there were."""
        with self._connection() as connection:
            deleted = connection.exec_driver_sql(
                "DELETE FROM kombu_message WHERE queue_id ="
                " (SELECT id FROM kombu_queue WHERE name = ?) AND visible = 1",
                (queue,),
            )
        return int(deleted.rowcount)

    def drop_queue(self, queue: str) -> None:
        """Delete ``queue`` and every message in it."""
        with self._transaction() as connection:
            connection.exec_driver_sql(
                "DELETE FROM kombu_message WHERE queue_id ="
                " (SELECT id FROM kombu_queue WHERE name = ?)",
                (queue,),
            )
            connection.exec_driver_sql("DELETE FROM kombu_queue WHERE name = ?", (queue,))

    def release_free_pages(self) -> None:
        """Give free pages back to the file system once they are more than half the file
        (a file made before keeps them: its auto-vacuum is off, and only a VACUUM
        changes that)."""
        with self._connection() as connection:
            free = connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
            total = connection.exec_driver_sql("PRAGMA page_count").scalar() or 0
            if free * 2 <= total:
                return
            driver = connection.connection.driver_connection
            assert driver is not None  # a connection checked out has its driver's
            # Never waiting for another writer (this runs while polling): a later try will.
            driver.execute("PRAGMA busy_timeout=0")
            try:
                # As a script: one step of the pragma frees one page.
                driver.executescript(f"PRAGMA incremental_vacuum({RELEASE_PAGES});")
            except sqlite3.OperationalError:
                log.debug("free pages not given back this time", exc_info=True)
            finally:
                driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def close(self) -> None:
        """After the channels closed: what they had taken is settled or back."""
        if self._owners is not None:
            self._owners.release()
        self._engine.dispose()


def _engine(url: str) -> Engine:
    """An engine of ``url`` (``sqlite:///PATH``) whose connections commit every statement
    on its own (transactions are begun explicitly), on a file with kombu's tables."""
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000},
        poolclass=QueuePool,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
    )
    event.listen(engine, "connect", _configure)
    # In one write transaction: connections starting together on a new file would each
    # find no table, and each create it.
    with _transaction(engine) as connection:
        metadata.create_all(connection)  # kombu's tables (registered by its channel class)
        columns = {row[1] for row in connection.exec_driver_sql("PRAGMA table_info(kombu_message)")}
        if OWNER_COLUMN not in columns:  # kombu's transport reads and writes around it
            connection.exec_driver_sql(f"ALTER TABLE kombu_message ADD COLUMN {OWNER_COLUMN} TEXT")
        connection.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS {READY_INDEX} ON kombu_message (queue_id, visible, id)"
        )
    return engine


@contextlib.contextmanager
def _transaction(engine: Engine) -> Iterator[Connection]:
    """A write transaction, taking the file's write lock at once (as kombu does) so that
    it never fails half-way for a lock another writer took meanwhile."""
    with engine.connect() as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")


def _configure(dbapi_connection: Any, _record: Any) -> None:
    # Before the first table of a new file; nothing for a file made before.
    dbapi_connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
    _use_write_ahead_log(dbapi_connection)
    dbapi_connection.execute(f"PRAGMA journal_size_limit={MAX_WAL_BYTES}")
    # Every commit synced (kombu's default with its rollback journal): a message whose
    # publish returned is on the disk.
    dbapi_connection.execute("PRAGMA synchronous=FULL")


def _use_write_ahead_log(dbapi_connection: Any) -> None:
    """Switch the file to its write-ahead log (once: the file keeps it). The switch needs
    the file to itself and does not wait for it, so while another connection writes (two
    processes starting on a new file) it is tried again, for a while; past that the file
    keeps its rollback journal, kombu's default, until a later connection switches it."""
    give_up_at = time.monotonic() + WAL_SWITCH_WAIT_S
    while True:
        try:
            mode = dbapi_connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError:  # locked
            mode = None
        if mode == "wal" or time.monotonic() >= give_up_at:
            return
        time.sleep(WAL_SWITCH_RETRY_S)


class EmbeddedChannel(kombu_sqlalchemy.Channel):  # type: ignore[misc]
    """A channel whose messages live in the transport's :class:`Messages`."""

    connection: EmbeddedTransport

    def __init__(self, connection: EmbeddedTransport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._no_ack_queues: set[str | None] = set()  # consumed without acks (no_ack)

    @property
    def session(self) -> Any:
        raise AssertionError("the embedded broker's channels use their transport's tables")

    @property
    def _messages(self) -> Messages:
        return self.connection.messages

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._messages.create_queue(queue)

    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:
        self._messages.put(queue, dumps(payload))

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack_queues.discard(self._tag_to_queue.get(consumer_tag))
        return super().basic_cancel(consumer_tag)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            message = self.Message(self._take(queue, keep=not no_ack), channel=self)
        except Empty:
            return None
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        """The next message of a consumed queue."""
        return self._take(queue, keep=queue not in self._no_ack_queues)

    def _take(self, queue: str, keep: bool) -> dict[str, Any]:
        """The next message of ``queue``; ``keep``: until it is settled (else deleted at
        once: taken without ack)."""
        taken = self._messages.take(queue, keep)
        if taken is None:
            raise Empty()
        row_id, payload = taken
        try:
            message: dict[str, Any] = loads(payload)
            delivery_tag = message["properties"]["delivery_tag"]
        except (ValueError, LookupError, TypeError):
            # Not written by kombu: nothing could deliver it, ever.
            log.error("message %d of %s is not kombu's; deleted", row_id, queue)
            self._messages.delete(row_id)
            raise Empty() from None
        if keep:
            self.connection.taken[delivery_tag] = row_id
        return message

    def _get_and_deliver(self, queue: str, callback: Any) -> None:
        """Take from ``queue`` while polling, when the last look found it ready."""
        ready = self.connection.ready
        if queue not in ready:
            raise Empty()
        try:
            super()._get_and_deliver(queue, callback)
        except Empty:
            ready.discard(queue)  # emptied since (another consumer took it)
            raise

    def _size(self, queue: str) -> int:
        return self._messages.size(queue)

    def _purge(self, queue: str) -> int:
        return self._messages.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        """Once per binding of the queue: :meth:`queue_delete` drops the queue instead."""

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, **kwargs)  # its bindings
        self._messages.drop_queue(queue)

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        # Deleted first: should that fail, the message is still unacked, and comes back
        # when the channel closes.
        self._forget(delivery_tag)
        super().basic_ack(delivery_tag, multiple)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            self._forget(delivery_tag)
        super().basic_reject(delivery_tag, requeue)  # a requeue comes to _restore

    def _forget(self, delivery_tag: str) -> None:
        row_id = self.connection.taken.get(delivery_tag)
        if row_id is not None:
            self._messages.delete(row_id)
            del self.connection.taken[delivery_tag]

    def _restore(self, message: Any) -> None:
        """A message back to its queue: the row it was taken from, visible again (kombu
        would store a copy through the exchange it came by)."""
        row_id = self.connection.taken.pop(message.delivery_tag, None)
        if row_id is None:  # not taken from the tables by this transport
            super()._restore(message)
            return
        self._messages.restore(row_id)


class EmbeddedTransport(kombu_sqlalchemy.Transport):  # type: ignore[misc]
    """kombu's SQLAlchemy transport over :class:`Messages`: pass it to
    ``kombu.Connection("sqlite:///PATH", transport=EmbeddedTransport)``."""

    Channel = EmbeddedChannel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._messages: Messages | None = None
        self.taken: dict[str, int] = {}  # delivery tag -> row, of messages not settled
        self.ready: set[str] = set()  # consumed queues the last look found a message in
        self._release_due_at = 0.0
        self._recover_due_at = time.monotonic() + RECOVER_EVERY_S  # done when connecting

    @property
    def messages(self) -> Messages:
        if self._messages is None:
            self._messages = Messages(self.client.hostname)
            self._messages.recover()
        return self._messages

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver one message (kombu's loop). Each round first tries the queues found
        ready last time, then asks the tables once which queues are ready now."""
        started = time.monotonic()
        interval = self.polling_interval
        if timeout and interval and interval > timeout:
            interval = timeout
        while True:
            if self._deliver_one():
                return
            if timeout is not None and time.monotonic() - started >= timeout:
                raise TimeoutError()
            if interval is not None:
                time.sleep(interval)

    def _deliver_one(self) -> bool:
        for look in (False, True):
            if look:
                consumed = self._consumed()
                self.ready = consumed & self.messages.ready() if consumed else set()
                self._look_after_the_file()
            if self.ready:
                with contextlib.suppress(Empty):
                    self.cycle.get(self._deliver)
                    return True
        return False

    def _consumed(self) -> set[str]:
        return {queue for channel in self.channels for queue in channel._active_queues}

    def _look_after_the_file(self) -> None:
        """Now and then while polling: messages of connections gone, free pages."""
        now = time.monotonic()
        if now >= self._recover_due_at:
            self._recover_due_at = now + RECOVER_EVERY_S
            self.messages.recover()
        if now >= self._release_due_at:
            self._release_due_at = now + RELEASE_EVERY_S
            self.messages.release_free_pages()

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)  # closes the channels: unacked ones restored
        if self._messages is not None:
            self._messages.close()
            self._messages = None
