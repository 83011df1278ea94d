"""Signed completion webhooks: when a job reaches a terminal status, POST a JSON notice to the URL the job
named, signed with the job's secret, delivered at least once through a durable SQL outbox.

**Signatures** follow the Standard Webhooks specification (https://www.standardwebhooks.com), made and
checked by its published library (``standardwebhooks``): headers ``webhook-id`` (the outbox row id: the
same on every retry of one notice, so receivers de-duplicate on it), ``webhook-timestamp`` (Unix seconds of
the attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``. The key of
a job is derived from its ``webhook.secret`` by :func:`signing_key`:

- a secret given as ``whsec_<base64>`` (what Standard Webhooks tools generate) is used as is: the key is
  the base64-decoded bytes;
- any other secret is used as raw bytes: the key is the secret's UTF-8 bytes, i.e. the Standard Webhooks
  form is ``"whsec_" + base64(secret.encode("utf-8"))``.

A receiver checks a notice with :func:`verify` or any Standard Webhooks library given
``signing_key(secret)``; it rejects timestamps more than 5 minutes away (replay protection).

**Where notices may go** (checked at submission by ``service.policies.check_webhook`` and again at every
attempt, by :class:`PinnedTransport`): the URL is http(s) without credentials; its host is in
``RSAE_WEBHOOK_ALLOWED_HOSTS`` (exact names or ``*.suffix``); its port is in ``RSAE_WEBHOOK_ALLOWED_PORTS``
(80 and 443 unless configured); *every* address the host resolves to is public (:func:`address_allowed`:
loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT) and IPv4-mapped / -embedding
IPv6 addresses refused, unless inside ``RSAE_WEBHOOK_ALLOWED_NETWORKS``); the connection goes to the
checked address (one DNS lookup per attempt; the URL's name travels only in the ``Host`` header and the TLS
SNI / certificate check); redirects are not followed; no proxy from the environment is used.

**Delivery** (:func:`enqueue` / :func:`deliver_due`): the notice is written to ``webhook_deliveries`` in the
same transaction as the job's terminal status (``service.jobs.transition`` calls :func:`enqueue`), sent at
once by the process that finished the job (:func:`notify_in_background`), and otherwise by the reaper of
every worker (``worker.lease.reap_once`` calls :func:`deliver_due`). Failed attempts (connection errors,
timeouts, 408, 429, 5xx) are retried with exponential backoff (``RSAE_WEBHOOK_BACKOFF_SECONDS`` doubling, at
most :data:`BACKOFF_MAX_SECONDS` apart) for ``RSAE_WEBHOOK_RETRY_SECONDS`` (24 h) after the job finished;
refusals (address, port or host not allowed, a redirect, another 4xx) are final. The job's events get one
``log`` event with a generic outcome (``delivered``, ``refused: address not allowed``, ``failed after N
attempts``); the details of each attempt go to the service log only, so a job cannot probe the network
through its events.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatch
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from .models import Job, WebhookDelivery, new_id, utcnow

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
"""Prefix of a secret given in the Standard Webhooks form (base64 key bytes follow)."""
TOLERANCE_SECONDS = 300
"""Largest age (or future skew) of a signed timestamp that :func:`verify` accepts (the library's window)."""
TIMEOUT_SECONDS = 10.0
"""Connect / read / write timeout of one delivery attempt."""
CLAIM_SECONDS = 60.0
"""How long a claimed delivery is hidden from other deliverers (longer than one attempt can take); a
deliverer that dies mid-attempt leaves the notice due again after this."""
BACKOFF_MAX_SECONDS = 3600.0
"""Longest wait between two attempts of one notice."""
DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): its addresses reach the embedded IPv4 address."""
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
"""Carrier-grade NAT space (RFC 6598): not private per :mod:`ipaddress`, but not public either."""

Resolver = Callable[[str, int], list[str]]
"""``resolver(host, port)`` -> the IP addresses (strings) ``host`` resolves to."""


class WebhookRefused(Exception):
    """A final outcome: the notice must not be (or was not accepted when) sent; never retried.

    ``outcome`` is the generic text shown to the job's owner (``refused: address not allowed``); the
    exception message carries the detail for the service log.
    """

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome


class _Retryable(Exception):
    """An attempt that may succeed later: 408, 429, 5xx, or a failed DNS lookup."""


@dataclass(frozen=True)
class Policy:
    """Where notices may go (see the module docstring); built from settings by :meth:`from_settings`."""

    hosts: tuple[str, ...] = ()
    """Allowed host names: exact or ``*.suffix`` globs, compared case-insensitively."""
    ports: tuple[int, ...] = (80, 443)
    """Allowed TCP ports (the URL's explicit port, else 80 for http and 443 for https)."""
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Networks allowed even though not public (e.g. ``127.0.0.1/32`` for a local test receiver)."""

    @classmethod
    def from_settings(cls, settings: Any) -> "Policy":
        """From ``Settings.webhook_allowed_hosts`` / ``webhook_allowed_ports`` / ``webhook_allowed_networks``."""
        return cls(
            hosts=tuple(settings.webhook_allowed_hosts),
            ports=tuple(settings.webhook_allowed_ports),
            networks=tuple(ipaddress.ip_network(n) for n in settings.webhook_allowed_networks),
        )


# -- where notices may go -------------------------------------------------------------------------------
def host_allowed(url: str, allowed: Iterable[str]) -> bool:
    """True if ``url`` is http(s) without credentials and its host matches one of ``allowed`` (exact names
    or ``*.suffix`` globs, case-insensitive). Names only: see :func:`check_url` for ports and addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    host = parts.hostname.lower()
    return any(fnmatch(host, pattern.lower()) for pattern in allowed)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return None


def address_allowed(address: str, networks: Iterable[Any] = ()) -> bool:
    """True if a notice may be sent to IP ``address``: inside one of ``networks``, or a public address.

    Refused (per :mod:`ipaddress`, RFC 6890 special-purpose registries): loopback, private, link-local,
    multicast, reserved, unspecified, site-local, not globally routable (e.g. ``100.64.0.0/10``), and IPv6
    addresses that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64), which
    would reach that IPv4 address. A string that is not an IP address is refused.
    """
    ip = _ip(address)
    if ip is None:
        return False
    if any(ip.version == n.version and ip in n for n in networks):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and (
        ip.ipv4_mapped is not None or ip.sixtofour is not None or ip.teredo is not None or ip in NAT64_PREFIX
    ):
        return False
    if ip.version == 4 and ip in SHARED_ADDRESS_SPACE:
        return False
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or getattr(ip, "is_site_local", False)
        or not ip.is_global
    )


def url_port(url: str) -> int | None:
    """The TCP port of http(s) ``url`` (explicit, else 80 / 443); None if the URL has no valid port."""
    parts = urlsplit(url)
    try:
        return parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # "host:99999" or "host:x"
        return None


def check_url(url: str, policy: Policy) -> None:
    """Check what can be checked without DNS: scheme, credentials, host allow-list, port, and the address
    when the host is an IP literal.

    Raises:
        WebhookRefused: outcome ``refused: host not allowed``, ``refused: port not allowed`` or
            ``refused: address not allowed``.
    """
    if not host_allowed(url, policy.hosts):
        raise WebhookRefused("refused: host not allowed", f"{url}: host not in RSAE_WEBHOOK_ALLOWED_HOSTS")
    port = url_port(url)
    if port is None or port not in policy.ports:
        raise WebhookRefused("refused: port not allowed", f"{url}: port {port} not in RSAE_WEBHOOK_ALLOWED_PORTS")
    host = urlsplit(url).hostname or ""
    if _ip(host) is not None and not address_allowed(host, policy.networks):
        raise WebhookRefused("refused: address not allowed", f"{url}: address {host} not allowed")


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (``socket.getaddrinfo``, TCP), in resolver order, duplicates dropped.

    Raises:
        _Retryable: the lookup failed (DNS may answer later).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _Retryable(f"cannot resolve {host!r}: {e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class PinnedTransport(httpx.HTTPTransport):
    """An httpx transport that checks each request's URL against a :class:`Policy`, resolves its host
    once, checks *every* resolved address (:func:`address_allowed`) and connects to the first one.

    The URL's host is replaced by the checked IP before the request reaches httpcore, so there is no
    second DNS lookup between check and connect (no DNS-rebinding window); the ``Host`` header keeps the
    name (httpx set it when the request was built) and, for https, the ``sni_hostname`` request extension
    makes httpcore send the name as TLS SNI and check the certificate against it.

    Args:
        policy: where requests may go.
        resolver: name -> addresses (default :func:`resolve`); tests inject fixed answers.
        **kwargs: passed to :class:`httpx.HTTPTransport` (e.g. ``verify``).

    Raises (from ``handle_request``):
        WebhookRefused: URL, port or an address not allowed.
        _Retryable: the name did not resolve.
    """

    def __init__(self, policy: Policy, *, resolver: Resolver | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy, self.resolver = policy, resolver or resolve
        self.connected_to: str | None = None
        """The address of the last request (for logs and tests)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Check, resolve, pin, send (see the class docstring)."""
        url = request.url
        check_url(str(url), self.policy)
        host = url.raw_host.decode("ascii")  # IDNA-encoded
        port = url.port or DEFAULT_PORTS[url.scheme]
        addresses = [host] if _ip(host) is not None else self.resolver(host, port)
        if not addresses:
            raise _Retryable(f"{host!r} resolved to no address")
        bad = [a for a in addresses if not address_allowed(a, self.policy.networks)]
        if bad:
            raise WebhookRefused("refused: address not allowed", f"{host} resolves to {', '.join(bad)}")
        self.connected_to = addresses[0]
        request.url = url.copy_with(host=addresses[0].split("%", 1)[0])
        if url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": host}
        return super().handle_request(request)


# -- signatures (Standard Webhooks) -------------------------------------------------------------------
def secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot key a webhook, or None: a ``whsec_`` secret must be strict base64 of at least
    16 bytes (any other secret is used as its UTF-8 bytes and is fine)."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return "a secret starting with 'whsec_' must continue with base64 (the Standard Webhooks form)"
    if len(key) < 16:
        return "a 'whsec_' secret must encode at least 16 bytes"
    return None


def signing_key(secret: str) -> str:
    """The Standard Webhooks key (``whsec_<base64>``) of a job's webhook secret: the secret itself if it
    is already in that form, else ``"whsec_" + base64(secret.encode("utf-8"))`` (the secret's UTF-8
    bytes are the HMAC-SHA256 key)."""
    if secret.startswith(SECRET_PREFIX) and secret_problem(secret) is None:
        return secret
    return SECRET_PREFIX + base64.b64encode(secret.encode("utf-8")).decode("ascii")


def signed_headers(secret: str, msg_id: str, body: bytes, *, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: ``webhook-id``, ``webhook-timestamp`` (``at``, default
    now, in Unix seconds) and ``webhook-signature`` (``v1,<base64>``, by ``standardwebhooks.Webhook.sign``)."""
    at = at or datetime.now(timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(signing_key(secret)).sign(msg_id, at, body),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes | str) -> bool:
    """Check a received notice with ``standardwebhooks.Webhook.verify``: the three headers are present
    (names compared case-insensitively), one of the ``webhook-signature`` entries matches the body, and
    the timestamp is within :data:`TOLERANCE_SECONDS` of now.

    Returns:
        True if authentic; False on any mismatch or malformed input (missing headers, a non-numeric or
        non-ASCII timestamp or signature, an unusable secret). Never raises.
    """
    try:
        Webhook(signing_key(secret)).verify(body, {str(k): str(v) for k, v in headers.items()}, json_parse=False)
    except Exception:  # noqa: BLE001 - any malformed input is a failed verification, by contract
        return False
    return True


# -- one attempt ------------------------------------------------------------------------------------------
def send(
    url: str,
    secret: str,
    msg_id: str,
    body: bytes,
    policy: Policy,
    *,
    timeout: float = TIMEOUT_SECONDS,
    resolver: Resolver | None = None,
    verify_tls: Any = True,
) -> int:
    """POST ``body`` (JSON) once to ``url``, signed (:func:`signed_headers`), through a
    :class:`PinnedTransport`; redirects are not followed and no environment proxy is used.

    Returns:
        The receiver's HTTP status (2xx).

    Raises:
        WebhookRefused: not allowed (host, port, address), a redirect (``refused: redirect not followed``)
            or another final 4xx (``refused: receiver answered 4xx``).
        _Retryable: 408, 429 or 5xx, or the name did not resolve.
        httpx.HTTPError: connection error or timeout (retryable).
    """
    transport = PinnedTransport(policy, resolver=resolver, verify=verify_tls)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "rsae-service-webhook",
        **signed_headers(secret, msg_id, body),
    }
    with httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client:
        r = client.post(url, content=body, headers=headers)
    if r.status_code in (408, 429) or r.status_code >= 500:
        raise _Retryable(f"{url} ({transport.connected_to}) answered {r.status_code}")
    if 300 <= r.status_code < 400:
        raise WebhookRefused(
            "refused: redirect not followed",
            f"{url} ({transport.connected_to}) answered {r.status_code} to {r.headers.get('location')!r}",
        )
    if r.status_code >= 400:
        raise WebhookRefused("refused: receiver answered 4xx", f"{url} answered {r.status_code}")
    return r.status_code


# -- the outbox -------------------------------------------------------------------------------------------
def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def notice(job: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook body for a finished job: ``{"type": "job.finished", "job": {...}}`` with the job's id,
    status, stage, progress, attempt, created_at, finished_at, error and metrics (no secrets)."""
    keep = ("id", "status", "stage", "progress", "attempt", "created_at", "finished_at", "error", "metrics")
    return {"type": "job.finished", "job": {k: job.get(k) for k in keep}}


def enqueue(session: Session, job_id: str) -> str | None:
    """Add the notice of job ``job_id`` (just moved to a terminal status, in this ``session``'s transaction)
    to the outbox, if its request asked for a webhook. Commits nothing: the row commits or rolls back with
    the status change (called by ``service.jobs.transition``).

    Returns:
        The new delivery's id (its ``webhook-id``), or None when the job asked for no webhook.
    """
    cols = (Job.id, Job.status, Job.stage, Job.progress, Job.attempt, Job.created_at, Job.finished_at)
    row = session.execute(select(*cols, Job.error, Job.metrics, Job.request).where(Job.id == job_id)).first()
    if row is None or not isinstance((row.request or {}).get("webhook"), dict):
        return None
    job = {**row._asdict(), "created_at": _iso(row.created_at), "finished_at": _iso(row.finished_at)}
    body = json.dumps(notice(job), separators=(",", ":"), default=str)
    now = utcnow()
    delivery = WebhookDelivery(
        id=new_id(), job_id=job_id, payload=body, attempts=0, next_attempt_at=now, state="pending", created_at=now
    )
    session.add(delivery)
    return delivery.id


@dataclass
class DeliveryResult:
    """Outcome of one :func:`deliver_due` pass: delivery id -> outcome of this pass's attempt."""

    outcomes: dict[str, str] = field(default_factory=dict)

    @property
    def delivered(self) -> list[str]:
        """Ids delivered in this pass."""
        return [k for k, v in self.outcomes.items() if v == "delivered"]


def backoff(settings: Any, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: ``webhook_backoff_seconds * 2**(attempts-1)``,
    at most :data:`BACKOFF_MAX_SECONDS`."""
    return min(settings.webhook_backoff_seconds * 2 ** max(0, attempts - 1), BACKOFF_MAX_SECONDS)


def _attempt(
    settings: Any, make_session: sessionmaker[Session], delivery_id: str, now: datetime, resolver: Resolver | None
) -> str | None:
    """Claim delivery ``delivery_id`` if due (conditional UPDATE: one winner among deliverers), send it once,
    record the result. Returns the outcome, or None if another deliverer had it."""
    from .jobs import add_event

    with make_session.begin() as s:
        claimed = s.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(
                attempts=WebhookDelivery.attempts + 1,
                next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS),
                updated_at=now,
            ),
            execution_options={"synchronize_session": False},
        )
        if claimed.rowcount != 1:
            return None
        w = WebhookDelivery
        d = s.execute(select(w.job_id, w.payload, w.attempts, w.created_at).where(w.id == delivery_id)).one()
        request = s.scalar(select(Job.request).where(Job.id == d.job_id)) or {}
    hook = request.get("webhook") if isinstance(request, dict) else None

    state, outcome, next_at = "failed", "refused: no webhook", now
    if isinstance(hook, dict):
        try:
            code = send(
                hook["url"], hook["secret"], delivery_id, d.payload.encode(), Policy.from_settings(settings),
                resolver=resolver,
            )  # fmt: skip
            state, outcome = "delivered", "delivered"
            log.info("webhook %s of job %s delivered (%d) on attempt %d", delivery_id, d.job_id, code, d.attempts)
        except WebhookRefused as e:
            outcome = e.outcome
            log.warning("webhook %s of job %s %s: %s", delivery_id, d.job_id, outcome, e)
        except Exception as e:  # noqa: BLE001 - connection errors, timeouts, 5xx, DNS: retry until the deadline
            wait = backoff(settings, d.attempts)
            expires = d.created_at + timedelta(seconds=settings.webhook_retry_seconds)
            if now + timedelta(seconds=wait) > expires:
                outcome = f"failed after {d.attempts} attempts"
            else:
                state, outcome, next_at = "pending", f"attempt {d.attempts} failed", now + timedelta(seconds=wait)
            log.warning(
                "webhook %s of job %s: attempt %d failed (%s: %s); %s",
                delivery_id,
                d.job_id,
                d.attempts,
                type(e).__name__,
                e,
                f"next in {wait:.0f} s" if state == "pending" else "giving up",
            )

    with make_session.begin() as s:
        done = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == d.attempts)
            .values(
                state=state,
                last_outcome=outcome,
                next_attempt_at=next_at,
                updated_at=utcnow(),
                delivered_at=utcnow() if state == "delivered" else None,
            ),
            execution_options={"synchronize_session": False},
        )
        if done.rowcount == 1 and state != "pending":
            add_event(
                s,
                d.job_id,
                "log",
                {
                    "message": f"webhook {outcome}",
                    "webhook": outcome.split(":", 1)[0].split(" ", 1)[0],  # delivered / refused / failed
                    "webhook_id": delivery_id,
                    "attempts": d.attempts,
                },
            )
    return outcome


def deliver_due(
    settings: Any,
    make_session: sessionmaker[Session],
    *,
    job_id: str | None = None,
    now: datetime | None = None,
    limit: int = 64,
    budget_seconds: float | None = None,
    resolver: Resolver | None = None,
) -> DeliveryResult:
    """Attempt every due notice once (``state = 'pending'`` and ``next_attempt_at <= now``), oldest first, at
    most ``limit``, 8 at a time. Safe in many processes at once: each attempt first claims its row with a
    conditional UPDATE. Called by the reaper every pass, and (with ``job_id``) right after a job finished.

    Args:
        job_id: only this job's notices.
        now: the current time (tests pass a later instant to reach retries without waiting).
        budget_seconds: claim no more rows after this long (default ``settings.reaper_interval_seconds``),
            so a pass of slow receivers does not hold up the reaper; the rest are due at the next pass.
        resolver: DNS override for tests (see :class:`PinnedTransport`).

    Returns:
        The outcome of each attempt made.
    """
    now = now or utcnow()
    q = select(WebhookDelivery.id).where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
    if job_id is not None:
        q = q.where(WebhookDelivery.job_id == job_id)
    with make_session() as s:
        due = list(s.scalars(q.order_by(WebhookDelivery.next_attempt_at).limit(limit)))
    out = DeliveryResult()
    if not due:
        return out
    stop_at = time.monotonic() + (settings.reaper_interval_seconds if budget_seconds is None else budget_seconds)

    def one(delivery_id: str) -> None:
        if time.monotonic() > stop_at:
            return
        try:
            outcome = _attempt(settings, make_session, delivery_id, now, resolver)
        except Exception:  # noqa: BLE001 - a database error: the row stays due (or claimed) and is retried
            log.exception("webhook %s: delivery bookkeeping failed", delivery_id)
            return
        if outcome is not None:
            out.outcomes[delivery_id] = outcome

    with ThreadPoolExecutor(max_workers=min(8, len(due)), thread_name_prefix="webhook") as pool:
        list(pool.map(one, due))
    return out


def notify_job_finished(make_session: sessionmaker[Session], settings: Any, job_id: str) -> DeliveryResult:
    """Send the due notices of job ``job_id`` now (a no-op unless its terminal transition queued one).
    Failures stay in the outbox for the reaper's :func:`deliver_due`."""
    return deliver_due(settings, make_session, job_id=job_id, budget_seconds=TIMEOUT_SECONDS)


def notify_in_background(make_session: sessionmaker[Session], settings: Any, job_id: str) -> None:
    """Run :func:`notify_job_finished` in a daemon thread (a slow receiver must not hold up a worker or a
    request). If the process dies first, the outbox row stays due and a reaper delivers it."""
    threading.Thread(
        target=notify_job_finished, args=(make_session, settings, job_id), name=f"webhook-{job_id[:8]}", daemon=True
    ).start()
