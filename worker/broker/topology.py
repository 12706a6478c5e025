"""The broker objects of the contract: exchanges, the command queue, the dead-letter queue,
the worker's own lanes (``worker/broker/lanes.py``) and (RabbitMQ only) the delay queues of
delayed retries.

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

from schemas.commands import Command
from worker.broker.connection import is_amqp
from worker.broker.lanes import Lane, lanes_from, vendor_of
from worker.results import Rejected
from worker.settings import Settings

SAFE_DEAD_LETTERING = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True)
class Topology:
    commands: Exchange
    command_queue: Queue
    events: Exchange
    dead_letter_queue: Queue
    delay_queues: dict[float, Queue] = field(default_factory=dict)  # by delay in seconds
    lanes: dict[tuple[str, str], Lane] = field(default_factory=dict)  # by (vendor, tenant)

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
            # A lane is a command queue of its own: the same poison guard and dead letters.
            lanes=lanes_from(settings, arguments),
        )

    def lane_for(self, decoded: Command | Rejected) -> Lane | None:
        """The lane a command from the command queue goes to; None: handled from there."""
        if isinstance(decoded, Rejected):
            return None
        # Tenant names are case-insensitive; configured ones are kept in lower case.
        return self.lanes.get((vendor_of(decoded), decoded.tenant.lower()))

    @property
    def queues(self) -> list[Queue]:
        """Every queue the worker declares."""
        lanes = [lane.queue for lane in self.lanes.values()]
        return [self.command_queue, self.dead_letter_queue, *self.delay_queues.values(), *lanes]

    def declare(self, channel: object) -> None:
        """Declare everything (idempotent; the same arguments every time)."""
        self.events.bind(channel).declare()
        for queue in self.queues:
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
