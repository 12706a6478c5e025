"""Confirm bookkeeping: a delivery is acked only once all its publishes are confirmed."""

from __future__ import annotations

from typing import Any

from worker.broker.confirms import Confirms


class FakeChannel:
    """What Confirms uses of a py-amqp channel: confirm mode and the ack/nack events."""

    def __init__(self) -> None:
        self.confirm_mode = False
        self.events: dict[str, set[Any]] = {"basic_ack": set(), "basic_nack": set()}

    def confirm_select(self) -> None:
        self.confirm_mode = True

    def ack(self, tag: int, multiple: bool = False) -> None:
        for callback in self.events["basic_ack"]:
            callback(tag, multiple)

    def nack(self, tag: int, multiple: bool = False) -> None:
        for callback in self.events["basic_nack"]:
            callback(tag, multiple)


class Log:
    def __init__(self) -> None:
        self.done: list[str] = []

    def on(self, what: str) -> Any:
        return lambda: self.done.append(what)


def publish(confirms: Confirms, count: int, log: Log, name: str) -> None:
    with confirms.group(log.on(f"{name} acked"), log.on(f"{name} requeued")):
        for _ in range(count):
            confirms.published()


def test_a_delivery_waits_for_every_publish_made_for_it() -> None:
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    assert channel.confirm_mode
    publish(confirms, 2, log, "a")  # event + dead letter: sequence numbers 1 and 2
    channel.ack(1)
    assert log.done == []
    channel.ack(2)
    assert log.done == ["a acked"]
    assert confirms.unconfirmed == 0


def test_multiple_confirms_everything_up_to_the_tag_and_no_more() -> None:
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    for name in "abc":
        publish(confirms, 1, log, name)
    channel.ack(2, multiple=True)
    assert log.done == ["a acked", "b acked"]
    assert confirms.unconfirmed == 1
    channel.ack(3)
    assert log.done == ["a acked", "b acked", "c acked"]


def test_out_of_order_confirms_settle_each_delivery_once() -> None:
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    publish(confirms, 1, log, "a")
    publish(confirms, 1, log, "b")
    channel.ack(2)
    channel.ack(1)
    channel.ack(2)  # a confirm the broker repeats changes nothing
    assert log.done == ["b acked", "a acked"]


def test_a_nack_requeues_once_and_never_acks() -> None:
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    publish(confirms, 3, log, "a")
    channel.nack(1)
    channel.ack(3, multiple=True)
    assert log.done == ["a requeued"]
    assert confirms.unconfirmed == 0


def test_without_confirm_mode_or_publishes_the_follow_up_runs_at_once() -> None:
    log = Log()
    plain = FakeChannel()
    publish(Confirms(plain, enabled=False), 2, log, "embedded")
    assert not plain.confirm_mode
    publish(Confirms(FakeChannel(), enabled=True), 0, log, "nothing published")
    assert log.done == ["embedded acked", "nothing published acked"]


def test_a_confirm_that_arrives_before_the_group_closes_still_counts() -> None:
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    with confirms.group(log.on("acked"), log.on("requeued")):
        confirms.published()
        channel.ack(1)  # the broker was quick: confirmed while the second is being made
        confirms.published()
        assert log.done == []
    assert log.done == []
    channel.ack(2)
    assert log.done == ["acked"]


def test_a_group_whose_publishing_failed_is_never_settled() -> None:
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    try:
        with confirms.group(log.on("acked"), log.on("requeued")):
            confirms.published()
            raise ConnectionError("channel lost")
    except ConnectionError:
        pass
    channel.ack(1)
    assert log.done == []


def test_a_group_opened_in_the_middle_of_a_publish_leaves_the_outer_one_tracked() -> None:
    """py-amqp may hand over a delivery while a publish is being written; were its
    settlement to open a group there, the outer delivery's later publishes still count."""
    channel, log = FakeChannel(), Log()
    confirms = Confirms(channel, enabled=True)
    with confirms.group(log.on("outer acked"), log.on("outer requeued")):
        confirms.published()  # 1: the outer delivery's event
        publish(confirms, 1, log, "inner")  # 2: a delivery settled mid-publish
        confirms.published()  # 3: the outer delivery's dead letter
    channel.ack(1)
    channel.ack(2)
    assert log.done == ["inner acked"]
    channel.ack(3)
    assert log.done == ["inner acked", "outer acked"]
