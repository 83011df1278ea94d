"""The Celery app, configured from :class:`service.config.Settings`.

``celery -A worker.celery_app worker -Q gpu -c 1`` works (the module attribute ``app`` is built on first
access), as does ``rsae-service worker``. Messages carry only the job id; the SQL row is the truth, so no
result backend is used and Celery task states are never exposed.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import tenacity
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from service.config import Settings, get_settings

log = logging.getLogger(__name__)

TASK_UPGRADE = "rsae.upgrade"
"""Name of the upgrade task (:func:`worker.tasks.upgrade`)."""


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: the process settings). Requires ``broker_url``."""
    settings = settings or get_settings()
    app = Celery("rsae", broker=settings.require_broker(), include=["worker.tasks"])
    app.conf.update(
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        task_routes={TASK_UPGRADE: {"queue": settings.queue_name}},
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
        #   (tested: tests/test_durability.py). Hence the timeout may stay shorter than the longest job.
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
        broker_transport_options={"socket_connect_timeout": 5, "socket_timeout": 30,
                                  "visibility_timeout": settings.broker_visibility_timeout},
        worker_send_task_events=False,
        task_send_sent_event=False,
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
        before_sleep=lambda rs: log.warning("publishing job %s failed (attempt %d): %s", job_id,
                                            rs.attempt_number, rs.outcome.exception() if rs.outcome else None),
        reraise=True)
    retrying(lambda: app.send_task(TASK_UPGRADE, args=[job_id], retry=True,
                                   retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                                 "interval_max": 0.5}))


def broker_ping(app: Celery, timeout: float = 2.0) -> None:
    """Connect to the broker once; raises ``kombu.exceptions.OperationalError`` if it is unreachable."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)


@lru_cache
def _default_app() -> Celery:
    return create_celery()


def __getattr__(name: str) -> Any:
    """Module attribute ``app`` (and ``celery``): the process-wide app, built lazily from the settings."""
    if name in ("app", "celery"):
        return _default_app()
    raise AttributeError(name)
