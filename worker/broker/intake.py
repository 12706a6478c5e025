"""Taking deliveries, stopped and started again on the consumer's loop.

A replica cut off from its store stops taking deliveries, so that the broker hands them to
replicas that can do them, and starts again once the store answers
(``worker/broker/consumer.py``). Both happen on the loop the handlers run on, so neither
may wait there for the broker's answer, as kombu's ``Consumer.cancel`` and ``consume`` do
(and on uvloop's loop the socket is non-blocking, where such a wait fails):

- Stopping sends ``basic.cancel`` and goes on. Deliveries already on their way still
  arrive, to the same callback, and are settled like any other; the broker's cancel-ok,
  read later with everything else, is where py-amqp forgets the tag's callback.
- Starting consumes again under a *new* tag, without waiting for the consume-ok. Not the
  old one: RabbitMQ 3.10 closes the channel (``INTERNAL_ERROR``) when a quorum queue is
  consumed again under a tag whose cancelled consumer still holds unacked deliveries, as
  the work this replica had started and held through the outage does.

kombu keeps no public handle on its tags or its callback, hence the private names of its
``Consumer`` used here, in this one place.
"""

from __future__ import annotations

from collections.abc import Iterable

from amqp import spec
from kombu import Consumer


class Intake:
    """The consumers of one connection (the command queue's and each lane's), which
    :meth:`stop` and :meth:`start` without waiting for the broker."""

    def __init__(self, consumers: Iterable[Consumer], amqp: bool) -> None:
        self._consumers = list(consumers)  # consuming already (entered)
        self._amqp = amqp  # py-amqp's channels; else kombu's embedded (virtual) ones
        self.stopped = False

    def stop(self) -> None:
        """Ask the broker for no more deliveries; those on their way still arrive."""
        for consumer in self._consumers:
            tags: dict[str, str] = consumer._active_tags  # by queue name
            for tag in tags.values():
                if self._amqp:  # nowait off: its cancel-ok clears py-amqp's callback
                    consumer.channel.send_method(spec.Basic.Cancel, "sb", (tag, False))
                else:  # a local call: nothing to wait for
                    consumer.channel.basic_cancel(tag)
        self.stopped = True

    def start(self) -> None:
        """Take deliveries again, each queue under a tag of its own."""
        for consumer in self._consumers:
            for queue in consumer.queues:
                consumer._active_tags.pop(queue.name, None)  # a new tag, not the cancelled one
                consumer._basic_consume(queue, nowait=True)
        self.stopped = False
