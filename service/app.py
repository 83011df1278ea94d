"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.orm import sessionmaker

from rsae_client.models import API_PREFIX

from .api.routes import datasets, health, jobs, saes
from .auth import TokenCache
from .config import Settings, get_settings
from .db import DbTimeouts, make_engine
from .encode import EncodeClient
from .events import EventHub, StreamSlots
from .limits import BodyLimitMiddleware
from .problems import install_problem_handlers
from .queue import create_celery
from .ratelimit import RateLimits
from .versioning import LegacyPathRedirect

V1_ROUTERS: list[APIRouter] = [saes.router, datasets.router, jobs.router]
"""The resource routers, mounted under ``/v1`` (each with its own prefix: ``/saes``, ``/jobs``). A new resource
(e.g. ``POST /v1/datasets``) appends its router here; its old unversioned path then redirects too."""
UNVERSIONED_ROUTERS: list[APIRouter] = [health.router]
"""Routers outside the version prefix: the probes ``/healthz`` and ``/readyz``."""


def operation_id(route: APIRoute) -> str:
    """The OpenAPI ``operationId`` of ``route``: its function's name (``create_job``, ``list_jobs``, ...), the
    names SDK generators turn into method names (FastAPI's default would be ``create_job_v1_jobs_post``)."""
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: read from the environment).

    The app owns one SQL engine (disposed at shutdown), one Celery app used only to publish task messages,
    one rate limiter (:class:`service.ratelimit.RateLimits`, Redis at the broker URL), one client of the encode
    worker (:class:`service.encode.EncodeClient`), one poller of the open event streams
    (:class:`service.events.EventHub`) and one cache of valid
    tokens (:class:`service.auth.TokenCache`, ``RSAE_AUTH_CACHE_SECONDS``). It never creates
    the schema: run ``rsae-service migrate`` (``serve`` does it first).
    """
    settings = settings or get_settings()
    settings.ensure_dirs()
    engine = make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        timeouts=DbTimeouts.from_settings(settings),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Release the SQL pool and the broker connections at shutdown."""
        yield
        await app.state.event_hub.aclose()
        await app.state.encoder.aclose()
        engine.dispose()
        app.state.celery.close()

    app = FastAPI(
        title="RSAE upgrade service",
        version="0.1.0",
        summary="Upgrade a pretrained sparse autoencoder's gate to a trainable rational function.",
        description="Resource routes live under /v1; the old unversioned paths (/jobs, /saes, ...) answer "
        "308 Permanent Redirect to them. Lists answer {data, has_more, next_cursor}: pass next_cursor as "
        "'after' for the next page. Errors are RFC 9457 problem+json.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.sessionmaker = sessionmaker(engine, expire_on_commit=False)
    app.state.streams = StreamSlots(settings.max_streams_per_user)
    app.state.event_hub = EventHub(app.state.sessionmaker)
    app.state.celery = create_celery(settings)
    app.state.rate_limits = RateLimits(settings)
    app.state.encoder = EncodeClient(settings, app.state.celery)
    app.state.token_cache = TokenCache(settings.auth_cache_seconds, settings.auth_cache_size)
    install_problem_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        upload_path=f"{API_PREFIX}/saes",
        other_uploads={f"{API_PREFIX}/datasets": settings.max_dataset_upload_bytes},
    )
    # added last, so outermost: an old path is redirected before any body limit or authentication
    app.add_middleware(
        LegacyPathRedirect, prefix=API_PREFIX, roots={r.prefix.strip("/").split("/")[0] for r in V1_ROUTERS}
    )
    for router in UNVERSIONED_ROUTERS:
        app.include_router(router)
    for router in V1_ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    return app
