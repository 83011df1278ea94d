"""The Celery app, configured from :class:`service.config.Settings`.

``celery -A worker.celery_app worker -Q gpu -c 1`` works (the module attribute ``app`` is built on first
access), as does ``rsae-service worker``. Messages carry only the job id; the SQL row is the truth, so no
result backend is used and Celery task states are never exposed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from service.config import Settings, get_settings

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
        # Early ack for now: a worker that dies mid-job loses the message, and the job stays 'running'.
        # Late ack is NOT a fix on Redis: an unacked message is redelivered after the visibility timeout
        # (1 h default) while the first copy still runs. The lease issue adds a SQL lease renewed by
        # heartbeat plus a reaper that re-queues expired jobs; keep acks early until then.
        task_acks_late=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options={"socket_connect_timeout": 5, "socket_timeout": 30},
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def enqueue_upgrade(app: Celery, job_id: str, *, retries: int = 2) -> None:
    """Publish the upgrade task for ``job_id``. Call only after the job row is committed.

    Raises:
        kombu.exceptions.OperationalError: the broker is unreachable after ``retries`` retries.
    """
    app.send_task(TASK_UPGRADE, args=[job_id], retry=True,
                  retry_policy={"max_retries": retries, "interval_start": 0, "interval_step": 0.5,
                                "interval_max": 1})


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
