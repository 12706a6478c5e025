"""Taking deliveries, stopped and started again on the consumer's loop.

A replica cut off from its store stops taking deliveries, so that the broker hands them to
replicas that can do them, and starts again once the store answers
(``worker/broker/consumer.py``). Both happen on the loop the handlers run on, so neither
may wait for the broker's answer: kombu's ``Consumer.cancel`` and ``consume`` would (and on
uvloop's loop the socket is non-blocking, where such a wait fails). So the consumer is
cancelled and started again by its tag with ``nowait``: the broker's answer is not asked
for. Deliveries already on their way when the cancel goes out still arrive, to the same
callback, and the consumer settles them as it does every other.

The tag stays the same: py-amqp keeps a tag's callback until the broker's cancel-ok, which
``nowait`` never asks for, so consuming again under the same tag replaces that callback
rather than leaving one behind per outage. kombu keeps no public handle on its tags or
its callback, hence the two private names read here, in this one place.
"""

from __future__ import annotations

from collections.abc import Iterable

from kombu import Consumer


class Intake:
    """The consumers of one connection (the command queue's and each lane's), which
    :meth:`stop` and :meth:`start` without waiting for the broker."""

    def __init__(self, consumers: Iterable[Consumer], amqp: bool) -> None:
        self._consumers = list(consumers)  # consuming already (entered)
        self._amqp = amqp  # py-amqp's channel; else kombu's embedded (virtual) one
        self.stopped = False

    def stop(self) -> None:
        """Ask the broker for no more deliveries; those on their way still arrive."""
        for consumer in self._consumers:
            for tag in _tags(consumer).values():
                if self._amqp:
                    consumer.channel.basic_cancel(tag, nowait=True)
                else:  # a local call: nothing to wait for
                    consumer.channel.basic_cancel(tag)
        self.stopped = True

    def start(self) -> None:
        """Take deliveries again, under the same tags."""
        for consumer in self._consumers:
            tags = _tags(consumer)
            for queue in consumer.queues:
                queue.consume(
                    tags[queue.name], consumer._receive_callback, no_ack=False, nowait=True
                )
        self.stopped = False


def _tags(consumer: Consumer) -> dict[str, str]:
    """The consumer's tag of each queue it consumes (kombu's own record)."""
    tags: dict[str, str] = consumer._active_tags
    return tags

