"""How long deliveries waited on one replica, read from the spans it wrote
(``BENCH_SPANS_FILE``, see ``bench/relay_worker.py``).

Each delivery is a ``process <queue>`` span, from its receipt to its settlement (or its
give-back). The handler notes when the store answered its claim (a ``relay.claim`` event);
the answer ``Claimed`` is where the command started: from then on it holds the key and may
call the vendor, and is held through an outage rather than given back. So the time a
delivery waited *unstarted* on the replica is from its receipt to that event, or to its
settlement when it never started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROCESS_SPAN_PREFIX = "process "
CLAIM_EVENT = "relay.claim"
STARTED_ANSWER = "Claimed"
NS_PER_S = 1e9


@dataclass(frozen=True)
class DeliveryWait:
    outcome: str  # relay.outcome: succeeded, given_back, requeued, …
    message_id: str | None  # the command's id, as the publisher set it
    on_replica_s: float  # receipt to settlement (or give-back)
    unstarted_s: float  # receipt to its start (claim taken), or to settlement if never
    started: bool


def delivery_waits(path: Path) -> list[DeliveryWait]:
    """The deliveries of the replica whose spans are in ``path`` (none if it wrote none)."""
    if not path.exists():
        return []
    waits = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["name"].startswith(PROCESS_SPAN_PREFIX):
            waits.append(_wait(record))
    return waits


def _wait(record: dict[str, Any]) -> DeliveryWait:
    start_ns, end_ns = record["start_ns"], record["end_ns"]
    started_ns = next(
        (
            event["time_ns"]
            for event in record["events"]
            if event["name"] == CLAIM_EVENT
            and event["attributes"].get("relay.claim.answer") == STARTED_ANSWER
        ),
        None,
    )
    attributes = record["attributes"]
    return DeliveryWait(
        outcome=str(attributes.get("relay.outcome")),
        message_id=attributes.get("messaging.message.id"),
        on_replica_s=(end_ns - start_ns) / NS_PER_S,
        unstarted_s=((started_ns if started_ns is not None else end_ns) - start_ns) / NS_PER_S,
        started=started_ns is not None,
    )
