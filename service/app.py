"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.orm import sessionmaker

from .api.routes import health, jobs, saes
from .auth import TokenCache
from .config import Settings, get_settings
from .db import DbTimeouts, make_engine
from .events import StreamSlots
from .limits import BodyLimitMiddleware
from .problems import install_problem_handlers
from .queue import create_celery
from .ratelimit import RateLimits


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: read from the environment).

    The app owns one SQL engine (disposed at shutdown), one Celery app used only to publish task messages,
    one rate limiter (:class:`service.ratelimit.RateLimits`, Redis at the broker URL) and one cache of valid
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
        engine.dispose()
        app.state.celery.close()

    app = FastAPI(
        title="RSAE upgrade service",
        version="0.1.0",
        summary="Upgrade a pretrained sparse autoencoder's gate to a trainable rational function.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessionmaker = sessionmaker(engine, expire_on_commit=False)
    app.state.streams = StreamSlots(settings.max_streams_per_user)
    app.state.celery = create_celery(settings)
    app.state.rate_limits = RateLimits(settings)
    app.state.token_cache = TokenCache(settings.auth_cache_seconds, settings.auth_cache_size)
    install_problem_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    for module in (health, saes, jobs):
        app.include_router(module.router)
    return app
