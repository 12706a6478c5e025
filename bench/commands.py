"""The commands a benchmark run sends, and publishing them over kombu (persistent,
routing key = type)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from kombu import Exchange, Producer

PERSISTENT = 2


def batch_deletes(count: int, tenant: str | None = None) -> list[dict[str, Any]]:
    """Single-object deletes, each with an id of its own (nothing is replayed)."""
    tenancy = {} if tenant is None else {"tenant": tenant}
    return [
        {"type": "batch-delete", "id": str(uuid.uuid4()), **tenancy,
         "params": {"object_uuids": [str(uuid.uuid4())]}}
        for _ in range(count)
    ]


def cancel_task(tenant: str, task_id: int) -> dict[str, Any]:
    return {"type": "cancel-task", "id": str(uuid.uuid4()), "tenant": tenant,
            "params": {"task_id": task_id}}


def publish_command(producer: Producer, exchange: Exchange, command: dict[str, Any]) -> None:
    producer.publish(
        json.dumps(command).encode(),
        exchange=exchange,
        routing_key=command["type"],
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=PERSISTENT,
        message_id=command["id"],
        retry=False,
    )


class Confirms:
    """The publisher confirms of one channel, numbered by RabbitMQ 1, 2, 3…"""

    def __init__(self, channel: Any) -> None:
        self._floor = 0  # every publish up to this one is confirmed ("multiple")
        self._single: set[int] = set()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._floor = max(self._floor, tag)
        else:
            self._single.add(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        raise RuntimeError(f"the broker refused publish {tag} (multiple: {multiple})")

    def count(self) -> int:
        return self._floor + sum(tag > self._floor for tag in self._single)
