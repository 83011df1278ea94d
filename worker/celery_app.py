"""The worker's Celery app: the service's broker configuration (:func:`service.queue.create_celery`) plus
the task modules a worker process imports (:data:`TASK_MODULES`).

``celery -A worker.celery_app worker -Q gpu -c 1`` works (the module attribute ``app`` is built on first
access), as does ``rsae-service worker`` (which names this module to Celery). Messages carry only the job
id; the SQL row is the truth, so no result backend is used and Celery task states are never exposed.
Publishing (:func:`service.queue.enqueue_upgrade`) needs no worker code: tasks are sent by name.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from service.config import Settings
from service.queue import create_celery as create_client

TASK_MODULES: tuple[str, ...] = ("worker.tasks",)
"""Modules holding the tasks (``rsae.upgrade``), imported by a worker process at start."""


def create_celery(settings: Settings | None = None) -> Celery:
    """The worker's Celery app for ``settings`` (default: the process settings): the service's app
    (same broker, queue, routes and acknowledgement settings) with :data:`TASK_MODULES` registered.
    Requires ``broker_url``."""
    return create_client(settings, include=TASK_MODULES)


@lru_cache
def _default_app() -> Celery:
    return create_celery()


def __getattr__(name: str) -> Any:
    """Module attribute ``app`` (and ``celery``): the process-wide app, built lazily from the settings."""
    if name in ("app", "celery"):
        return _default_app()
    raise AttributeError(name)
