"""Opening a broker connection the same way everywhere (worker, client, tests)."""

from __future__ import annotations

from kombu import Connection


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def connect(url: str, poll_interval_s: float = 0.02, heartbeat_s: int = 30) -> Connection:
    """A kombu connection (not yet connected).

    RabbitMQ: publisher confirms on (kombu leaves them off, and without them a published
    event can vanish silently), heartbeats on. The embedded broker polls its SQLite file;
    ``poll_interval_s`` bounds how late it notices a new message.
    """
    if is_amqp(url):
        return Connection(url, transport_options={"confirm_publish": True}, heartbeat=heartbeat_s)
    connection = Connection(url)
    # The SQLAlchemy transport hands its transport options to create_engine, so the
    # polling interval is set on the transport itself.
    connection.transport.polling_interval = poll_interval_s
    return connection
