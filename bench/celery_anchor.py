"""The Celery anchor: the same work as a Celery task, one httpx POST per task.

``acks_late`` (ack after the task ran, as command-relay acks after the event is out),
results ignored; each task records its completion time in a Redis list, from which the
harness computes tasks/s. The queue is a quorum queue, like command-relay's. The worker
is started by the harness as

    celery -A bench.celery_anchor worker -P threads -c 32 -Q QUEUE --without-gossip ...

configured by BENCH_AMQP_URL, BENCH_REDIS_URL, BENCH_SANDBOX_URL, BENCH_CELERY_QUEUE and
BENCH_DONE_KEY.
"""

from __future__ import annotations

import functools
import os
import time

import httpx
import redis
from celery import Celery  # type: ignore[import-untyped]
from kombu import Exchange, Queue

from bench import vendor

TASK = "bench.call_vendor"


def celery_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                 durable=True, queue_arguments={"x-queue-type": "quorum"})


def celery_delay_objects() -> tuple[list[str], list[str]]:
    """Queues and exchanges a Celery worker declares for native delayed delivery when it
    consumes a quorum queue (fixed names, no prefix setting): deleted after the run."""
    names = [f"celery_delayed_{level}" for level in range(28)]
    return names, [*names, "celery_delayed_delivery"]


def make_app(amqp_url: str, queue_name: str) -> Celery:
    celery = Celery("bench_anchor", broker=amqp_url)
    celery.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        task_default_queue=queue_name,
        task_queues=[celery_queue(queue_name)],
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True},  # the backlog must all arrive
    )
    return celery


app = make_app(
    os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@localhost:5672//"),
    os.environ.get("BENCH_CELERY_QUEUE", "bench.celery"),
)


@functools.cache
def _clients() -> tuple[httpx.Client, str, redis.Redis]:
    # Made on first use in each worker process (after a prefork fork, never before).
    sandbox_url = os.environ["BENCH_SANDBOX_URL"]
    http = httpx.Client(headers=vendor.eset_authorization(httpx.Client(), sandbox_url))
    return http, vendor.batch_delete_url(sandbox_url), redis.Redis.from_url(
        os.environ["BENCH_REDIS_URL"]
    )


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def call_vendor(object_uuid: str) -> None:
    http, url, done = _clients()
    http.post(url, json={"objectUuids": [object_uuid]}).raise_for_status()
    done.rpush(os.environ["BENCH_DONE_KEY"], repr(time.time()))
