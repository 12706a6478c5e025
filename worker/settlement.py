"""What becomes of one delivery: the handler decides it, the consumer carries it out (a
leaf both import, so the broker side never imports the handler)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from schemas.events import ResultEvent


class Action(Enum):
    ACK = "ack"
    DEAD_LETTER = "dead_letter"  # the original is kept in the dead-letter queue
    REQUEUE = "requeue"
    DELAY = "delay"  # back to the command queue after a delay queue's TTL; the original is acked
    FORWARD = "forward"  # to its lane (worker/broker/lanes.py); the original is acked
    # This replica can not do it now (its store is away: not started, or held as long as a
    # delivery may be): a copy to the back of the queue it came from, keeping its delivery
    # count; the original is acked. Unlike REQUEUE, it uses up none of the delivery limit.
    GIVE_BACK = "give_back"


@dataclass(frozen=True)
class Settlement:
    """What becomes of a delivery: the event to publish (if any), then the action."""

    event: ResultEvent | None
    action: Action
    delay_s: float = 0.0  # DELAY: how long the command waits before it comes back
    retries: int = 0  # DELAY: the delayed retries it will have taken
    attempts: int = 0  # DELAY: the vendor calls made for it so far
    queue: str = ""  # FORWARD: the lane's queue

    @classmethod
    def for_event(cls, event: ResultEvent) -> Settlement:
        keep = event.data.outcome != "succeeded" and not event.data.replayed
        return cls(event, Action.DEAD_LETTER if keep else Action.ACK)


@dataclass(frozen=True)
class DeliveryInfo:
    """What the broker's headers say about this delivery of the command."""

    retries: int = 0  # delayed retries already taken
    attempts: int = 0  # vendor calls made by earlier deliveries
    last_delivery: bool = False  # the broker dead-letters it if this delivery fails too
    publisher: str | None = None  # the AMQP user that published it (worker/broker/origin.py)
