"""A run's own broker names, all under one prefix: runs never see each other's messages,
and whatever a run leaves behind is found by its prefix."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.broker.topology import Topology
from worker.settings import Settings


@dataclass(frozen=True)
class Names:
    prefix: str

    @classmethod
    def unique(cls, kind: str, label: str) -> Names:
        return cls(f"{kind}.{label}.{uuid.uuid4().hex[:8]}")

    @property
    def command_exchange(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def command_queue(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def event_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.commands.dead"

    @property
    def lane_queue_prefix(self) -> str:
        """The prefix of the worker's lanes (``RELAY_LANE_QUEUE_PREFIX``)."""
        return f"{self.prefix}.lane."

    @property
    def observed_events(self) -> str:
        """The queue a run collects every result event in."""
        return f"{self.prefix}.observed-events"

    @property
    def replies(self) -> str:
        """The ``reply_to`` queue of messages a run follows by ``correlation_id`` (the
        worker answers on reply queues named ``relay.replies.…`` only)."""
        return f"relay.replies.{self.prefix}"

    def lane_queue(self, vendor: str, tenant: str) -> str:
        """The lane of ``tenant``'s account at a rate-limited ``vendor``."""
        return f"{self.lane_queue_prefix}{vendor}.{tenant}"

    def settings(self) -> dict[str, str]:
        """The worker settings that give replicas these names."""
        return {
            "command_exchange": self.command_exchange,
            "command_queue": self.command_queue,
            "event_exchange": self.event_exchange,
            "dead_letter_queue": self.dead_letter_queue,
            "lane_queue_prefix": self.lane_queue_prefix,
        }

    def topology(
        self, broker_url: str, *, tenants: Mapping[str, Any] | None = None,
        rate_limits: Mapping[str, str] | None = None,
    ) -> Topology:
        """What replicas with these names declare (otherwise default settings); given
        their ``tenants`` and ``rate_limits``, their lanes too."""
        names: dict[str, Any] = self.settings()
        settings = Settings(
            broker_url=broker_url, tenants=tenants or {}, rate_limits=rate_limits or {}, **names
        )
        return Topology.from_settings(settings)
