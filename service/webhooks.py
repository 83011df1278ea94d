"""Signed completion webhooks: when a job reaches a terminal status, POST a JSON notice to the URL the job
named, signed with the job's secret, retried with backoff.

Signature scheme (the Stripe / Standard Webhooks pattern): headers ``RSAE-Webhook-Id`` (unique per
notice), ``RSAE-Webhook-Timestamp`` (Unix seconds) and ``RSAE-Webhook-Signature: v1=<hex>`` where ``<hex>``
is HMAC-SHA256(secret, ``"{timestamp}.{body}"``). A receiver recomputes it with :func:`verify` and
rejects timestamps older than a few minutes (replay protection). Delivery is retried on connection errors,
timeouts, 429 and 5xx (exponential backoff, ``tenacity``); other 4xx answers are final.

Webhook URLs are never free-form: the server accepts only hosts listed in ``RSAE_WEBHOOK_ALLOWED_HOSTS``
(exact names or ``*.suffix``), so a job cannot make the worker call arbitrary internal addresses. With the
list empty (the default) webhooks are disabled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from fnmatch import fnmatch
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

SIGNATURE_VERSION = "v1"
TOLERANCE_SECONDS = 300
"""Largest accepted age of a signed timestamp in :func:`verify`."""


class WebhookRefused(Exception):
    """The receiver answered with a final (non-retryable) status."""


class _Retryable(Exception):
    """A 429 / 5xx answer: try again."""


def host_allowed(url: str, allowed: list[str]) -> bool:
    """True if ``url`` is http(s) and its host matches one of ``allowed`` (exact or ``*.suffix`` globs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    host = parts.hostname.lower()
    return any(fnmatch(host, pattern.lower()) for pattern in allowed)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={mac}"


def verify(
    secret: str, headers: dict[str, str], body: bytes, *, now: float | None = None, tolerance: int = TOLERANCE_SECONDS
) -> bool:
    """Check a received notice: the signature matches and the timestamp is at most ``tolerance`` s old.

    ``headers`` keys are compared case-insensitively. Returns False on any mismatch (never raises).
    """
    h = {k.lower(): v for k, v in headers.items()}
    try:
        ts = int(h["rsae-webhook-timestamp"])
        given = h["rsae-webhook-signature"]
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), given)


def notice(job: dict[str, Any]) -> dict[str, Any]:
    """The webhook body for a finished job: ``{"type": "job.finished", "job": {...}}`` (no secrets)."""
    keep = ("id", "status", "stage", "progress", "attempt", "created_at", "finished_at", "error", "metrics")
    return {"type": "job.finished", "job": {k: job.get(k) for k in keep}}


def deliver(
    url: str,
    secret: str,
    payload: dict[str, Any],
    *,
    attempts: int = 5,
    timeout: float = 10.0,
    backoff_max: float = 30.0,
) -> int:
    """POST ``payload`` as signed JSON to ``url``; retry transient failures.

    Each attempt is signed afresh (new timestamp, same ``RSAE-Webhook-Id``, so receivers can de-duplicate).

    Returns:
        The receiver's final HTTP status (2xx).

    Raises:
        WebhookRefused: a final 4xx answer (other than 408/429).
        httpx.HTTPError or _Retryable: still failing after ``attempts`` tries.
    """
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    notice_id = str(uuid.uuid4())

    @retry(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=backoff_max),
        retry=retry_if_exception(lambda e: isinstance(e, (_Retryable, httpx.TransportError))),
        reraise=True,
    )
    def attempt() -> int:
        ts = int(time.time())
        r = httpx.post(
            url,
            content=body,
            timeout=timeout,
            follow_redirects=False,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "rsae-service-webhook",
                "RSAE-Webhook-Id": notice_id,
                "RSAE-Webhook-Timestamp": str(ts),
                "RSAE-Webhook-Signature": sign(secret, ts, body),
            },
        )
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Retryable(f"{url} answered {r.status_code}")
        if r.status_code >= 300:
            raise WebhookRefused(f"{url} answered {r.status_code}")
        return r.status_code

    return attempt()


def notify_job_finished(make_session: Any, settings: Any, job_id: str) -> str | None:
    """Deliver the webhook of job ``job_id`` if its request asked for one and the job is terminal.

    Records the outcome as a ``log`` event of the job (``webhook delivered`` / ``webhook failed``).
    Delivery is at most once per terminal transition that calls this (a worker that dies between the
    status change and the delivery sends nothing; the job's events and ``GET /jobs/{id}`` remain the
    source of truth).

    Returns:
        ``"delivered"``, ``"failed"``, or None when no webhook was due.
    """
    from .jobs import add_event
    from .models import TERMINAL_STATUSES, Job
    from .schemas import JobOut

    with make_session() as s:
        job = s.get(Job, job_id)
        hook = (job.request or {}).get("webhook") if job is not None else None
        if not hook or job.status not in TERMINAL_STATUSES:
            return None
        payload = notice(JobOut.from_row(job).model_dump(mode="json"))
    if not host_allowed(hook["url"], settings.webhook_allowed_hosts):  # the allow-list may have shrunk
        outcome, message = "failed", f"webhook to {hook['url']} not sent: host no longer allowed"
    else:
        try:
            code = deliver(hook["url"], hook["secret"], payload, attempts=settings.webhook_attempts)
            outcome, message = "delivered", f"webhook delivered to {hook['url']} ({code})"
        except Exception as e:  # noqa: BLE001 - any delivery failure is recorded, never raised
            outcome, message = "failed", f"webhook to {hook['url']} failed: {type(e).__name__}: {e}"
    log.info("job %s: %s", job_id, message)
    with make_session.begin() as s:
        add_event(s, job_id, "log", {"message": message, "webhook": outcome})
    return outcome


def notify_in_background(make_session: Any, settings: Any, job_id: str) -> None:
    """Run :func:`notify_job_finished` in a daemon thread (retries must not hold up a worker or a request)."""
    import threading

    threading.Thread(
        target=notify_job_finished, args=(make_session, settings, job_id), name=f"webhook-{job_id[:8]}", daemon=True
    ).start()
