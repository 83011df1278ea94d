"""FastAPI ``Annotated`` dependencies: settings, Celery app and page size of the running application."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Query, Request

from service.auth import UserDep
from service.config import Settings
from service.db import SessionDep
from service.models import User
from service.problems import ProblemError
from service.ratelimit import client_address, token_key

__all__ = ["CeleryDep", "LimitDep", "SessionDep", "SettingsDep", "SubmitterDep"]


async def get_app_settings(request: Request) -> Settings:
    """The settings the application was created with (``async``: no I/O, so no worker-thread hop)."""
    return request.app.state.settings


async def get_celery(request: Request) -> Celery:
    """The application's Celery app (used only to publish messages; ``async``: no I/O, no worker-thread hop)."""
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
"""The application's :class:`~service.config.Settings`."""
CeleryDep = Annotated[Celery, Depends(get_celery)]
"""The application's Celery app."""


async def page_limit(
    settings: SettingsDep,
    limit: int | None = Query(
        None, ge=1, description="Page size (default RSAE_PAGE_SIZE_DEFAULT, at most RSAE_PAGE_SIZE_MAX)."
    ),
) -> int:
    """The requested page size; 422 naming ``limit`` above the server's maximum (``async``: no I/O)."""
    if limit is None:
        return min(settings.page_size_default, settings.page_size_max)
    if limit > settings.page_size_max:
        raise ProblemError(422, "validation_error", f"limit must be at most {settings.page_size_max}", field="limit")
    return limit


LimitDep = Annotated[int, Depends(page_limit)]
"""The page size of a list request."""


def submitter(request: Request, user: UserDep) -> User:
    """The authenticated user of a submission (``POST /jobs``, ``POST /saes``), counted against the
    submission rate limits of its token and its client address before the body is read
    (:meth:`service.ratelimit.RateLimits.submission`).

    Raises:
        service.auth.AuthError: 401, as for :data:`service.auth.UserDep`.
        service.ratelimit.RateLimited: 429 with Retry-After beyond ``rate_limit_submissions_per_token`` or
            ``rate_limit_submissions_per_address``.
    """
    request.app.state.rate_limits.submission(client_address(request), token_key(request.headers.get("authorization")))
    return user


SubmitterDep = Annotated[User, Depends(submitter)]
"""The authenticated user of a submission route, after the submission rate limits."""
