"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import text

from service.api.deps import CeleryDep, SessionDep
from service.jsonbody import StrictJSONRoute
from service.problems import ProblemError, problem_responses
from service.queue import broker_ping

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"], route_class=StrictJSONRoute)


@router.get("/healthz", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
def healthz() -> dict[str, str]:
    """Liveness: the process answers. Touches no dependency."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {
            "content": {
                "application/json": {"example": {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}}
            }
        },
        **problem_responses(503, s503="a dependency is down (problem+json)"),
    },
)
def readyz(session: SessionDep, celery: CeleryDep) -> dict[str, object]:
    """Readiness: ``SELECT 1`` on the database and a connection to the broker both succeed."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready
        log.warning("readiness: database: %s", e)
        checks["database"] = f"error: {type(e).__name__}"
    try:
        broker_ping(celery)
        checks["broker"] = "ok"
    except Exception as e:  # noqa: BLE001
        log.warning("readiness: broker: %s", e)
        checks["broker"] = f"error: {type(e).__name__}"
    if any(v != "ok" for v in checks.values()):
        failed = ", ".join(k for k, v in checks.items() if v != "ok")
        raise ProblemError(503, "not_ready", f"not ready: {failed} unreachable", checks=checks)
    return {"status": "ready", "checks": checks}
