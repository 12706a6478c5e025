"""The broker objects of the contract: exchanges, the command queue, the dead-letter queue,
and (RabbitMQ only) the delay queues of delayed retries.

On RabbitMQ the command queue is a durable quorum queue whose ``delivery-limit`` dead-letters
a message that keeps crashing workers. A delay queue holds a message for its TTL, then
dead-letters it back to the command queue: a retry later without holding a delivery.
Dead-lettering is ``at-least-once`` (it needs ``overflow: reject-publish``), so a message
moved between queues is never dropped on the way. The embedded broker ignores queue
arguments and has no delay queues.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kombu import Exchange, Queue

from worker.broker import is_amqp
from worker.settings import Settings

SAFE_DEAD_LETTERING = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True)
class Topology:
    commands: Exchange
    command_queue: Queue
    events: Exchange
    dead_letter_queue: Queue
    delay_queues: dict[float, Queue] = field(default_factory=dict)  # by delay in seconds

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
                **SAFE_DEAD_LETTERING,
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
        delays = {*settings.retry_delays_s, settings.defer_delay_s} if quorum else set()
        return cls(
            commands=commands,
            command_queue=command_queue,
            events=Exchange(settings.event_exchange, type="topic", durable=True),
            dead_letter_queue=dead_letters,
            delay_queues={d: _delay_queue(settings.command_queue, d) for d in sorted(delays)},
        )

    def declare(self, channel: object) -> None:
        """Declare everything (idempotent; the same arguments every time)."""
        self.events.bind(channel).declare()
        self.command_queue.bind(channel).declare()
        self.dead_letter_queue.bind(channel).declare()
        for queue in self.delay_queues.values():
            queue.bind(channel).declare()


def _delay_queue(command_queue: str, delay_s: float) -> Queue:
    delay_ms = round(delay_s * 1000)
    return Queue(
        f"{command_queue}.delay.{delay_ms}ms",
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": command_queue,
            **SAFE_DEAD_LETTERING,
        },
    )
