"""Lanes: a queue of its own for every rate-limited vendor account.

Publishers send every command to the one command queue. A command whose vendor has a
rate limit (ESET: 10 calls/s per account) is taken off it at once and forwarded, with a
publisher confirm, to its account's *lane*, a durable queue named
``<lane_queue_prefix><vendor>.<tenant>``; every replica consumes every lane, each with a
prefetch of about three seconds of the account's budget. So a backlog of one account
waits in its own lane, on the broker, while the command queue keeps draining at consumer
speed: another account's commands, and those of vendors without a limit (handled straight
from the command queue), never wait behind it. Each lane takes at most its prefetch of
deliveries, so the lanes do not compete for the handler slots of the command queue.

Lanes are declared from the configured tenants (one per tenant with an account of a
limited vendor). They are the worker's own queues: publishers never address them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kombu import Queue
from kombu.message import Message

from schemas.commands import (
    BatchDeleteCommand,
    CancelTaskCommand,
    Command,
    FetchPatchingCommand,
    SpaazaUpdateTriggersParams,
    UpdateTriggersCommand,
)
from worker.broker.connection import connect
from worker.ops.telemetry import Instruments
from worker.settings import Settings, TlsFiles, calls_per_s

log = logging.getLogger(__name__)

# A lane's prefetch holds this much of its account's budget: enough to keep the budget
# used with calls of up to about this long, and a delivery waits at most about this long
# (per replica consuming the lane) for its rate slot.
LANE_PREFETCH_S = 3.0
MIN_LANE_PREFETCH = 2
LANED_AT_HEADER = "x-relay-laned-at"  # when the command entered its lane (Unix seconds)


@dataclass(frozen=True)
class Lane:
    vendor: str
    tenant: str
    queue: Queue
    prefetch: int  # deliveries one replica takes from the lane at once

    @property
    def name(self) -> str:
        """The lane as metrics name it: ``eset.acme``."""
        return f"{self.vendor}.{self.tenant}"


def vendor_of(command: Command) -> str:
    """The vendor a command is sent to."""
    match command:
        case UpdateTriggersCommand(params=SpaazaUpdateTriggersParams()):
            return "spaaza"
        case CancelTaskCommand():
            return "fylr"
        case UpdateTriggersCommand() | BatchDeleteCommand() | FetchPatchingCommand():
            return "eset"
    raise AssertionError(f"no vendor for {command.type}")  # the contract is closed


def lanes_from(
    settings: Settings, queue_arguments: Mapping[str, Any]
) -> dict[tuple[str, str], Lane]:
    """One lane per configured account of a vendor with a rate limit, by (vendor, tenant)."""
    lanes = {}
    for vendor, limit in settings.rate_limits.items():
        prefetch = settings.lane_prefetch or max(
            MIN_LANE_PREFETCH, math.ceil(calls_per_s(limit) * LANE_PREFETCH_S)
        )
        for tenant_name, tenant in sorted(settings.tenants.items()):
            if getattr(tenant, vendor, None) is None:
                continue
            queue = Queue(
                f"{settings.lane_queue_prefix}{vendor}.{tenant_name}",
                durable=True,
                queue_arguments=dict(queue_arguments),
            )
            lanes[(vendor, tenant_name)] = Lane(vendor, tenant_name, queue, prefetch)
    return lanes


class LaneMonitor:
    """Each lane's backlog and how long its oldest command has waited, for ``/metrics``.

    The broker counts a lane's messages: asked every ``interval_s`` on a connection of its
    own, in a thread, since a question to the broker on the consumer's connection would
    block the loop until the answer came. The oldest waiting command entered the lane
    after the last one handed to this replica (a lane is first in, first out), so the time
    since that one entered bounds the oldest wait from above.
    """

    def __init__(
        self, lanes: Iterable[Lane], instruments: Instruments, broker_url: str, interval_s: float,
        tls: TlsFiles | None = None,
    ) -> None:
        self._lanes = list(lanes)
        self._instruments = instruments
        self._broker_url = broker_url
        self._tls = tls
        self._interval_s = interval_s
        self._last_laned_at: dict[str, float] = {}

    def delivered(self, lane: Lane, message: Message) -> None:
        """Record how long a delivery waited in its lane."""
        laned_at = _laned_at(message)
        if laned_at is None:
            return
        self._last_laned_at[lane.name] = laned_at
        wait_s = max(time.time() - laned_at, 0.0)
        self._instruments.lane_wait.record(wait_s, {"relay.lane": lane.name})

    def run(self, stop: threading.Event) -> None:
        """Ask for the backlogs until ``stop`` is set (the body of a thread)."""
        while self._lanes and not stop.wait(self._interval_s):
            try:
                with connect(self._broker_url, heartbeat_s=0, tls=self._tls) as connection:
                    channel = connection.channel()
                    while True:
                        self._poll(channel)
                        if stop.wait(self._interval_s):
                            return
            except Exception as error:  # the broker is away: the consumer reports that
                log.debug("lane backlogs not known (%r)", error)

    def _poll(self, channel: Any) -> None:
        now = time.time()
        for lane in self._lanes:
            backlog = channel.queue_declare(queue=lane.queue.name, passive=True).message_count
            attributes = {"relay.lane": lane.name}
            self._instruments.lane_backlog.set(backlog, attributes)
            last = self._last_laned_at.get(lane.name)
            oldest_s = max(now - last, 0.0) if backlog and last is not None else 0.0
            self._instruments.lane_oldest_wait.set(oldest_s, attributes)


def _laned_at(message: Message) -> float | None:
    value = (message.headers or {}).get(LANED_AT_HEADER)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None  # not ours, or mangled: no figure rather than a wrong one
    return float(value)
