"""The raw anchor: the least a worker can do for the same work, as a yardstick.

Shape: one thread, sequential. kombu consumes the command queue with a prefetch window;
for each delivery, in arrival order: decode JSON, one ``httpx.Client`` POST to the
sandbox (keep-alive, token fetched once), publish a small result event with publisher
confirms (the publish returns once RabbitMQ has it), ack. No validation, idempotency,
rate limit, retries, tracing or logging.

    python -m bench.raw_anchor AMQP_URL COMMAND_QUEUE EVENT_EXCHANGE SANDBOX_URL [PREFETCH]
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections import deque

import httpx
from kombu import Connection, Consumer, Producer, Queue
from kombu.message import Message

from bench import vendor


def main(amqp_url: str, queue_name: str, events: str, sandbox_url: str, prefetch: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    http = httpx.Client(headers=vendor.eset_authorization(httpx.Client(), sandbox_url))
    url = vendor.batch_delete_url(sandbox_url)
    with Connection(amqp_url, transport_options={"confirm_publish": True}) as connection:
        channel = connection.channel()
        producer = Producer(channel)

        def handle(message: Message) -> None:
            command = json.loads(message.body)
            answer = http.post(url, json={"objectUuids": command["params"]["object_uuids"]})
            outcome = "succeeded" if answer.status_code == 200 else "failed"
            event = {"data": {"command_id": command["id"], "outcome": outcome,
                              "status": answer.status_code}}
            producer.publish(
                json.dumps(event).encode(), exchange=events,
                routing_key=f"{command['type']}.{outcome}", content_type="application/json",
                delivery_mode=2, retry=False,
            )
            message.ack()

        # Deliveries are only queued by the callback: publishing (and waiting for its
        # confirm) inside it would re-enter py-amqp's frame loop and can lose a confirm.
        received: deque[Message] = deque()
        # The bench declared the queue (quorum, with the worker's arguments): no re-declare.
        queue = Queue(queue_name, no_declare=True)
        with Consumer(channel, queues=[queue], on_message=received.append,
                      prefetch_count=prefetch):
            while not stop.is_set():
                while received:
                    handle(received.popleft())
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)


if __name__ == "__main__":
    amqp, queue_name, events, sandbox = sys.argv[1:5]
    main(amqp, queue_name, events, sandbox, int(sys.argv[5]) if len(sys.argv) > 5 else 32)
