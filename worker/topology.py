"""The broker objects of the contract: exchanges, the command queue, the dead-letter queue.

On RabbitMQ the command queue is a durable quorum queue whose ``delivery-limit`` dead-letters
a message that keeps crashing workers; the embedded broker ignores queue arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from kombu import Exchange, Queue

from worker.broker import is_amqp
from worker.settings import Settings


@dataclass(frozen=True)
class Topology:
    commands: Exchange
    command_queue: Queue
    events: Exchange
    dead_letter_queue: Queue

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        quorum = is_amqp(settings.broker_url)
        commands = Exchange(settings.command_exchange, type="topic", durable=True)
        arguments = (
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": settings.delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": settings.dead_letter_queue,
            }
            if quorum
            else {}
        )
        command_queue = Queue(
            settings.command_queue,
            exchange=commands,
            routing_key="#",
            durable=True,
            queue_arguments=arguments,
        )
        dead_letters = Queue(
            settings.dead_letter_queue,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"} if quorum else {},
        )
        return cls(
            commands=commands,
            command_queue=command_queue,
            events=Exchange(settings.event_exchange, type="topic", durable=True),
            dead_letter_queue=dead_letters,
        )

    def declare(self, channel: object) -> None:
        """Declare everything (idempotent; the same arguments every time)."""
        self.events.bind(channel).declare()
        self.command_queue.bind(channel).declare()
        self.dead_letter_queue.bind(channel).declare()
