"""Publisher confirms without a wait per message.

Waiting for each publish's confirm before settling the next delivery costs a broker round
trip (a quorum queue's log write) per command, on the one thread that settles. Instead
the channel is put in confirm mode once, publishes are numbered the way RabbitMQ numbers
them (1, 2, 3… per channel), and a delivery's ack runs when the broker has confirmed
every publish made for it. A nack runs the fallback instead (the delivery is requeued and
its stored result replayed). If the channel is lost first, neither runs: the delivery was
never acked, so the broker redelivers it.

A confirm can arrive while the publishes for its delivery are still being made, so the
publishes are gathered into their group as they happen, and the group settles only once
it is closed.

A channel without confirms (the embedded broker, whose publish is a database write that
is done when it returns) runs the follow-up as soon as the group closes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

FollowUp = Callable[[], None]


@dataclass
class _Group:
    """The publishes made for one delivery, and what to do once they are settled."""

    on_confirmed: FollowUp
    on_refused: FollowUp
    outstanding: set[int] = field(default_factory=set)
    closed: bool = False
    refused: bool = False

    def settle_if_done(self) -> None:
        if self.closed and not self.refused and not self.outstanding:
            self.on_confirmed()

    def refuse(self) -> None:
        if self.closed and not self.refused:
            self.on_refused()
        self.refused = True


class Confirms:
    def __init__(self, channel: Any, enabled: bool) -> None:
        self._enabled = enabled
        self._published = 0  # sequence number of the last publish on this channel
        self._pending: dict[int, _Group] = {}  # by sequence number, in publish order
        self._open: _Group | None = None
        if enabled:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)

    @property
    def unconfirmed(self) -> int:
        return len(self._pending)

    @contextmanager
    def group(self, on_confirmed: FollowUp, on_refused: FollowUp) -> Iterator[None]:
        """Publishes made inside the block form one group: ``on_confirmed`` runs once the
        broker has confirmed all of them, ``on_refused`` if it refuses any. Neither runs
        when the block raises (the channel is then assumed lost)."""
        # Re-entrant: py-amqp may hand over a delivery in the middle of a publish, and if
        # that ever led to another group, the outer one gets its slot back afterwards.
        outer, group = self._open, _Group(on_confirmed, on_refused)
        self._open = group
        try:
            yield
        finally:
            self._open = outer
        group.closed = True
        if group.refused:
            group.on_refused()
        else:
            group.settle_if_done()

    def published(self) -> None:
        """Count one publish just made on the channel, into the open group."""
        self._published += 1
        if self._enabled and self._open is not None:
            self._open.outstanding.add(self._published)
            self._pending[self._published] = self._open

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        for number, group in self._take(delivery_tag, multiple):
            group.outstanding.discard(number)
            group.settle_if_done()

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        for number, group in self._take(delivery_tag, multiple):
            group.outstanding.discard(number)
            group.refuse()

    def _take(self, delivery_tag: int, multiple: bool) -> list[tuple[int, _Group]]:
        if not multiple:
            group = self._pending.pop(delivery_tag, None)
            return [] if group is None else [(delivery_tag, group)]
        # "Every publish up to delivery_tag": the oldest entries, as the dict keeps order.
        taken = []
        for number in self._pending:
            if number > delivery_tag:
                break
            taken.append(number)
        return [(number, self._pending.pop(number)) for number in taken]
