"""The broker side of the service: the Celery app factory, publishing an upgrade, pinging the broker.

The API and the reaper only *publish*: a message names the task by its string name
(:data:`TASK_UPGRADE`) and carries only the job id, so nothing here imports the task implementations.
Those live in :mod:`worker.tasks`; the worker's own app (:mod:`worker.celery_app`) is this factory plus the
task modules to import. Layering (enforced by import-linter, ``[tool.importlinter]`` in pyproject.toml):
``worker`` imports ``service``, never the reverse.

The SQL row is the truth, so no result backend is used and Celery task states are never exposed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import tenacity
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from .config import Settings, get_settings

log = logging.getLogger(__name__)

TASK_UPGRADE = "rsae.upgrade"
"""Name of the upgrade task (implemented by ``worker.tasks.upgrade``)."""

TASK_ENCODE = "rsae.encode"
"""Name of the encode task (implemented by ``worker.encode.encode``), on queue ``settings.encode_queue_name``."""

WORKER_APP = "worker.celery_app"
"""Module of the worker's Celery app, as ``celery -A`` takes it. Named, never imported, by the service:
``rsae-service worker`` hands it to Celery's command line (:func:`run_worker`)."""
ENCODE_WORKER_APP = "worker.encode_app"
"""Module of the encode worker's Celery app (``rsae-service encode-worker``)."""


def create_celery(settings: Settings | None = None, *, include: Sequence[str] = ()) -> Celery:
    """A Celery app for ``settings`` (default: the process settings). Requires ``broker_url``.

    Args:
        settings: the deployment.
        include: task modules a worker process imports at start (the worker passes its own; the API's
            publishing client needs none: tasks are sent by name).

    Raises:
        service.config.ConfigError: no broker URL.
    """
    settings = settings or get_settings()
    app = Celery("rsae", broker=settings.require_broker(), include=list(include))
    app.conf.update(
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        task_routes={
            TASK_UPGRADE: {"queue": settings.queue_name},
            TASK_ENCODE: {"queue": settings.encode_queue_name},
        },
        # One job at a time per worker process; do not reserve jobs another worker could start.
        worker_prefetch_multiplier=1,
        # Acknowledgement design (docs/reliability.md). The SQL lease, not the broker, decides who runs a
        # job: a message is only a hint "job X may be queued". So:
        # - Late ack: the message is acked when the task returns. A worker that dies between receiving a
        #   message and claiming the row (or a broker restart at that moment) leaves the message unacked;
        #   Redis redelivers it after the visibility timeout and the job is not lost.
        # - Late ack on Redis also redelivers the message of a job that is still running once the
        #   visibility timeout passes (or after a broker reconnect). That copy is harmless: worker.lease.claim
        #   is a conditional UPDATE from 'queued', so it finds the job leased and returns at once
        #   (tested: tests/e2e/test_durability.py). Hence the timeout may stay shorter than the longest job.
        # - A worker killed mid-job (pool child SIGKILLed): the message is acked, not requeued
        #   (task_reject_on_worker_lost=False); recovery belongs to the reaper, which re-queues the job
        #   once its lease expires and publishes a fresh message, capped by RSAE_MAX_ATTEMPTS. Requeueing
        #   here too would only add a duplicate.
        # - Connection loss does not cancel running tasks: the lease keeps them exclusive.
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        task_acks_on_failure_or_timeout=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # a Redis restart must not stop the worker
        broker_connection_timeout=5,
        broker_transport_options={
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            # A half-open connection (Redis restarted, NAT dropped) is noticed by a PING every 10 s and by
            # TCP keepalives, so the consumer reconnects and resumes consuming instead of waiting on a
            # dead socket (celery/celery#7276, #8091; kombu's Redis transport options).
            "health_check_interval": 10,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "visibility_timeout": settings.broker_visibility_timeout,
        },
        worker_send_task_events=False,
        task_send_sent_event=False,
        # Time limits of one task run, derived from the job deadline (checked between steps first): past
        # the soft limit SoftTimeLimitExceeded ends the job deadline_exceeded; past the hard limit the pool
        # process is killed, its message acked (task_acks_on_failure_or_timeout) and the reaper takes over.
        task_soft_time_limit=settings.job_deadline_seconds + settings.task_time_limit_grace_seconds,
        task_time_limit=settings.job_deadline_seconds + 2 * settings.task_time_limit_grace_seconds,
        # Memory recycling: a pool process is replaced after N tasks or once its RSS passes the limit (KiB).
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_max_memory_per_child=(
            settings.worker_max_memory_per_child_mb * 1024 if settings.worker_max_memory_per_child_mb else None
        ),
    )
    return app


def enqueue_upgrade(app: Celery, job_id: str, *, retries: int = 2) -> None:
    """Publish the upgrade task for ``job_id``. Call only after the job row is committed.

    Broker errors are retried ``retries`` times with exponential backoff (tenacity: 0.5 s doubling up to
    4 s); a duplicate publish is harmless (the worker's claim is conditional).

    Raises:
        kombu.exceptions.OperationalError (or OSError): the broker is unreachable after ``retries`` retries.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_exponential(multiplier=0.5, max=4),
        retry=tenacity.retry_if_exception_type((KombuOperationalError, OSError, ConnectionError)),
        before_sleep=lambda rs: log.warning(
            "publishing job %s failed (attempt %d): %s",
            job_id,
            rs.attempt_number,
            rs.outcome.exception() if rs.outcome else None,
        ),
        reraise=True,
    )
    retrying(
        lambda: app.send_task(
            TASK_UPGRADE,
            args=[job_id],
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        )
    )


def broker_ping(app: Celery, timeout: float = 2.0) -> None:
    """Connect to the broker once; raises ``kombu.exceptions.OperationalError`` if it is unreachable."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)


def run_worker(settings: Settings, extra_args: Sequence[str] = (), *, encode: bool = False) -> None:
    """Run a Celery worker of :data:`WORKER_APP` on ``settings.queue_name`` (concurrency 1, prefork) in this
    process, as ``celery -A worker.celery_app worker -Q <queue> -c 1 -P prefork --loglevel <level> ...``; with
    ``encode``, the long-lived encode worker instead: :data:`ENCODE_WORKER_APP` on ``settings.encode_queue_name``
    (its pool process keeps host models and SAEs loaded between requests: ``worker.encode``).

    Celery imports the worker's app module by name, so the service never imports :mod:`worker`. That app is
    built from the process settings (:func:`service.config.get_settings`), which ``settings`` must be.

    Args:
        settings: the deployment (its broker URL is checked here, so a missing one is a ``ConfigError``).
        extra_args: further ``celery worker`` arguments.
        encode: run the encode worker.
    """
    from celery.bin.celery import celery as celery_cli
    from click.exceptions import Exit

    settings.require_broker()
    argv = [
        "-A",
        ENCODE_WORKER_APP if encode else WORKER_APP,
        "worker",
        "-Q",
        settings.encode_queue_name if encode else settings.queue_name,
        "-c",
        "1",
        "-P",
        "prefork",
        "--loglevel",
        settings.log_level,
        *(["-n", "encode@%h"] if encode else []),
        *extra_args,
    ]
    try:
        celery_cli.main(args=argv, standalone_mode=False)
    except Exit:  # as Celery.worker_main: the worker's own exit is a normal return
        pass
