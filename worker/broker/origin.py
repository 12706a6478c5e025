"""Who published a command: the AMQP user whose tenants it may act for.

RabbitMQ refuses a publish whose ``user_id`` property is not the user of the connection it
comes on (unless that user has the ``impersonator`` tag), so a command's ``user_id`` names
its publisher; a command without one comes from an unknown publisher.

The worker moves commands on under its own user: to their lane, to a delay queue and back
through the command queue, to the dead-letter queue. RabbitMQ would refuse the
publisher's ``user_id`` there, so the worker's copy carries its own user as ``user_id`` and
the publisher in :data:`PUBLISHER_HEADER` (empty: unknown). That header is believed only
on a message whose ``user_id`` is the worker's user: one the broker saw the worker publish
(a publisher can write the header, never that ``user_id``). Everything else is judged by
its own ``user_id``, whatever queue it came from.
"""

from __future__ import annotations

from typing import Any

from kombu import Connection
from kombu.message import Message

from worker.broker.decoding import usable_text

PUBLISHER_HEADER = "x-relay-publisher"


def worker_user(connection: Connection) -> str:
    """The AMQP user the worker connects as (RabbitMQ's default, ``guest``, when the
    broker URL names none)."""
    return str(connection.info().get("userid") or "guest")


def publisher_of(message: Message, own_user: str | None) -> str | None:
    """The AMQP user that published ``message`` (None: unknown); the publisher the
    worker carried over when the worker (``own_user``) published this copy."""
    user_id = usable_text(message.properties.get("user_id"))
    headers = message.headers if isinstance(message.headers, dict) else {}
    if own_user is None or user_id != own_user or PUBLISHER_HEADER not in headers:
        return user_id
    return usable_text(headers[PUBLISHER_HEADER])


def carry_publisher(
    message: Message, headers: dict[str, Any], own_user: str | None
) -> dict[str, Any]:
    """Note ``message``'s publisher in ``headers`` of the copy the worker publishes; the
    copy's properties to add (its ``user_id``: the worker's own). Nothing when publishers
    are not checked (``own_user`` None)."""
    if own_user is None:
        return {}
    headers[PUBLISHER_HEADER] = publisher_of(message, own_user) or ""
    return {"user_id": own_user}
