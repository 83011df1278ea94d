"""The encode worker's Celery app: the service's broker configuration (:func:`service.queue.create_celery`) plus the
encode task (:mod:`worker.encode`), tuned for short requests served by one long-lived pool process.

``rsae-service encode-worker`` runs ``celery -A worker.encode_app worker -Q encode -c 1 -P prefork``. Differences
from the GPU worker's app (:mod:`worker.celery_app`):

- the pool process is never recycled after N tasks (``worker_max_tasks_per_child`` None): it keeps the host models
  and SAEs it loaded (:mod:`worker.encode`'s caches), which is the point of a long-lived worker; the memory limit
  per child still applies;
- messages are acknowledged on receipt (``task_acks_late`` False): an encode request is answered within
  ``encode_timeout_seconds`` or not at all, so a message lost with a dying worker must not be redelivered later;
- the task's time limits follow ``encode_timeout_seconds`` (soft: the request's timeout; hard: 10 s later).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from service.config import Settings, get_settings
from service.queue import create_celery as create_client

TASK_MODULES: tuple[str, ...] = ("worker.encode",)
"""Modules holding the encode task (``rsae.encode``)."""


def create_celery(settings: Settings | None = None) -> Celery:
    """The encode worker's Celery app for ``settings`` (default: the process settings). Requires ``broker_url``."""
    settings = settings or get_settings()
    app = create_client(settings, include=TASK_MODULES)
    app.conf.update(
        worker_max_tasks_per_child=None,
        task_acks_late=False,
        task_soft_time_limit=settings.encode_timeout_seconds,
        task_time_limit=settings.encode_timeout_seconds + 10,
        task_default_queue=settings.encode_queue_name,
    )
    return app


@lru_cache
def _default_app() -> Celery:
    return create_celery()


def __getattr__(name: str) -> Any:
    """Module attribute ``app`` (and ``celery``): the process-wide app, built lazily from the settings."""
    if name in ("app", "celery"):
        return _default_app()
    raise AttributeError(name)
