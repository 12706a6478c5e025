"""Opening a broker connection the same way everywhere (worker, client, tests)."""

from __future__ import annotations

from kombu import Connection


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def connect(
    url: str,
    poll_interval_s: float = 0.02,
    heartbeat_s: int = 30,
    wait_for_confirms: bool = True,
) -> Connection:
    """A kombu connection (not yet connected).

    RabbitMQ: heartbeats on, and each publish waits for its confirm (kombu leaves confirms
    off, and without them a published event can vanish silently), unless
    ``wait_for_confirms`` is off because the caller tracks confirms itself. The embedded
    broker polls its SQLite file; ``poll_interval_s`` bounds how late it notices a new
    message.
    """
    if is_amqp(url):
        options = {"confirm_publish": wait_for_confirms}
        return Connection(url, transport_options=options, heartbeat=heartbeat_s)
    connection = Connection(url)
    # The SQLAlchemy transport hands its transport options to create_engine, so the
    # polling interval is set on the transport itself.
    connection.transport.polling_interval = poll_interval_s
    return connection
