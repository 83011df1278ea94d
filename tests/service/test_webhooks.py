"""Completion webhooks: allow-listed hosts, ports and addresses only (checked on the resolved address the
connection is pinned to), no redirects, Standard Webhooks signatures, a durable outbox delivered at least
once by the reaper, generic outcomes in the job's events. Against real local HTTP receivers, the real
Postgres (and SQLite) and Redis."""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from service.app import create_app
from service.client import upload_sae
from service.config import Settings, get_settings
from service.db import get_sessionmaker
from service.migrate import upgrade
from service.models import Job, JobEvent, WebhookDelivery, utcnow
from service.webhooks import (
    Policy,
    WebhookRefused,
    _Retryable,
    address_allowed,
    check_url,
    deliver_due,
    send,
    signed_headers,
    signing_key,
    verify,
)
from support.servers import assert_problem, bearer, job_body, make_token
from support.webhooks import Receiver
from worker.lease import claim, new_owner, reap_once
from worker.tasks import _finish

SECRET = "s3cret-s3cret-s3cret"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def local(receiver: Receiver, *hosts: str, networks: tuple = LOOPBACK) -> Policy:
    """A policy that lets notices reach ``receiver`` (its port, ``hosts``, the loopback network)."""
    return Policy(hosts=hosts or ("127.0.0.1",), ports=(receiver.port,), networks=networks)


# -- signatures -----------------------------------------------------------------------------------------
def test_signatures_follow_standard_webhooks_and_verify_never_raises() -> None:
    body = b'{"type":"job.finished","job":{"id":"j1"}}'
    headers = signed_headers(SECRET, "msg-1", body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,") and verify(SECRET, headers, body)
    # Interoperable: any Standard Webhooks library given 'whsec_' + base64(secret) accepts it.
    key = "whsec_" + base64.b64encode(SECRET.encode()).decode()
    assert signing_key(SECRET) == key
    Webhook(key).verify(body, {k.title(): v for k, v in headers.items()}, json_parse=False)  # raises if not
    # A secret already in the whsec_ form is the key itself.
    whsec = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    assert signing_key(whsec) == whsec and verify(whsec, signed_headers(whsec, "m", body), body)
    assert not verify("another-secret-value", headers, body)
    assert not verify(SECRET, headers, body + b" ")
    assert not verify(SECRET, {**headers, "webhook-id": "msg-2"}, body)  # the id is signed
    old = signed_headers(SECRET, "msg-1", body, at=datetime.now(timezone.utc) - timedelta(hours=1))
    assert not verify(SECRET, old, body)  # replayed an hour later
    for bad in ("v1,é", "v1,\udcff", "²", "", "v1," + "A" * 10_000):  # was a TypeError on non-ASCII
        assert verify(SECRET, {**headers, "webhook-signature": bad}, body) is False
    for bad_ts in ("²", "x", "", "1e400", "\udcff"):
        assert verify(SECRET, {**headers, "webhook-timestamp": bad_ts}, body) is False
    assert verify(SECRET, {k: v for k, v in headers.items() if k != "webhook-id"}, body) is False
    assert verify(SECRET, headers, 12345) is False  # type: ignore[arg-type]


# -- where notices may go -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address,ok",
    [
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("224.0.0.1", False),
        ("ff02::1", False),
        ("240.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("100.64.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:93.184.215.14", False),  # IPv4-mapped: refused whatever it maps to
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("not-an-ip", False),
    ],
)
def test_address_policy(address: str, ok: bool) -> None:
    assert address_allowed(address) is ok


def test_allowed_networks_open_exactly_what_they_name() -> None:
    nets = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.1.0.0/16"))
    assert address_allowed("127.0.0.1", nets) and address_allowed("10.1.200.3", nets)
    assert not address_allowed("127.0.0.2", nets) and not address_allowed("10.2.0.1", nets)
    assert not address_allowed("::ffff:127.0.0.1", nets)


@pytest.mark.parametrize(
    "url,outcome",
    [
        ("https://hooks.example.org/x", None),
        ("http://hooks.example.org/x", None),
        ("https://a.internal.example.org:443/", None),
        ("https://example.org/x", "refused: host not allowed"),
        ("ftp://hooks.example.org/", "refused: host not allowed"),
        ("https://user:pw@hooks.example.org/", "refused: host not allowed"),
        ("https://hooks.example.org:8443/x", "refused: port not allowed"),
        ("http://hooks.example.org:22/", "refused: port not allowed"),
        ("https://hooks.example.org:99999/", "refused: port not allowed"),
        ("http://169.254.169.254/", "refused: address not allowed"),
        ("http://[::ffff:127.0.0.1]/", "refused: address not allowed"),
    ],
)
def test_url_policy(url: str, outcome: str | None) -> None:
    policy = Policy(hosts=("hooks.example.org", "*.internal.example.org", "169.254.169.254", "::ffff:127.0.0.1"))
    if outcome is None:
        check_url(url, policy)
    else:
        with pytest.raises(WebhookRefused) as e:
            check_url(url, policy)
        assert e.value.outcome == outcome


def test_delivery_is_pinned_to_the_checked_address(receiver: Receiver) -> None:
    """A name is resolved once; its address is checked and connected to, the name goes in the Host header."""
    body = b'{"x":1}'
    with pytest.raises(WebhookRefused, match="127.0.0.1") as e:  # loopback without allowed networks
        send(receiver.url, SECRET, "m1", body, local(receiver, networks=()))
    assert e.value.outcome == "refused: address not allowed" and receiver.received == []

    lookups: list[str] = []

    def resolver(answers: list[str]) -> Callable[[str, int], list[str]]:
        def resolve(host: str, port: int) -> list[str]:
            lookups.append(host)
            return answers

        return resolve

    url = f"http://hooks.test:{receiver.port}/hook"  # no real DNS knows hooks.test: only the pin reaches it
    assert send(url, SECRET, "m2", body, local(receiver, "hooks.test"), resolver=resolver(["127.0.0.1"])) == 200
    assert lookups == ["hooks.test"]
    headers, got = receiver.received[-1]
    assert headers["Host"] == f"hooks.test:{receiver.port}" and got == body
    assert verify(SECRET, {k.lower(): v for k, v in headers.items()}, got) and headers["webhook-id"] == "m2"

    for answers in (["10.0.0.5"], ["169.254.169.254"], ["::ffff:127.0.0.1"], ["127.0.0.1", "10.0.0.5"], ["fe80::1"]):
        with pytest.raises(WebhookRefused) as e:
            send(url, SECRET, "m3", body, local(receiver, "hooks.test"), resolver=resolver(answers))
        assert e.value.outcome == "refused: address not allowed", answers
    assert len(receiver.received) == 1

    # The real resolver: 'localhost' is allow-listed by name but resolves to loopback.
    with pytest.raises(WebhookRefused) as e:
        send(f"http://localhost:{receiver.port}/", SECRET, "m4", body, local(receiver, "localhost", networks=()))
    assert e.value.outcome == "refused: address not allowed" and len(receiver.received) == 1


def test_https_is_pinned_with_sni_and_the_certificate_checked_against_the_name(tmp_path: Path) -> None:
    """https to a name pinned to 127.0.0.1: TLS SNI is the name and the certificate must be valid for the
    name (a certificate for another name fails, although the address is the same)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=hooks.test"]
        + ["-addext", "subjectAltName=DNS:hooks.test"],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    receiver = Receiver(tls=server_ctx)
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        body = b'{"x":1}'
        pin = lambda host, port: ["127.0.0.1"]  # noqa: E731
        ok = f"https://hooks.test:{receiver.port}/hook"
        assert send(ok, SECRET, "m", body, local(receiver, "hooks.test"), resolver=pin, verify_tls=client_ctx) == 200
        other = f"https://other.test:{receiver.port}/hook"
        with pytest.raises(httpx.ConnectError, match="certificate|hostname"):
            send(other, SECRET, "m", body, local(receiver, "other.test"), resolver=pin, verify_tls=client_ctx)
        assert receiver.sni == ["hooks.test", "other.test"] and len(receiver.received) == 1
        assert receiver.received[0][0]["Host"] == f"hooks.test:{receiver.port}"
    finally:
        receiver.server.shutdown()


def test_ports_redirects_and_answers(receiver: Receiver) -> None:
    other = Receiver()
    try:
        policy = Policy(hosts=("127.0.0.1",), ports=(80, 443), networks=LOOPBACK)
        with pytest.raises(WebhookRefused) as e:
            send(receiver.url, SECRET, "m", b"{}", policy)
        assert e.value.outcome == "refused: port not allowed" and receiver.received == []

        receiver.statuses, receiver.location = [302], other.url
        with pytest.raises(WebhookRefused) as e:
            send(receiver.url, SECRET, "m", b"{}", local(receiver))
        assert e.value.outcome == "refused: redirect not followed"
        assert len(receiver.received) == 1 and other.received == []

        receiver.statuses = [503]
        with pytest.raises(_Retryable):
            send(receiver.url, SECRET, "m", b"{}", local(receiver))
        receiver.statuses = [404]
        with pytest.raises(WebhookRefused) as e:
            send(receiver.url, SECRET, "m", b"{}", local(receiver))
        assert e.value.outcome == "refused: receiver answered 4xx"
    finally:
        other.server.shutdown()


# -- the API --------------------------------------------------------------------------------------------
def test_api_accepts_only_allowed_webhooks_and_never_echoes_the_secret(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    make_teacher: Callable[..., Path],
) -> None:
    hook = {"url": "https://hooks.example.org/rsae", "secret": SECRET}
    with TestClient(create_app(), headers=bearer(make_token(database_url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        assert_problem(
            c.post("/v1/jobs", json={**job_body(sae_id), "webhook": hook}),
            422,
            field="webhook.url",
            code="webhook_not_allowed",
        )
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_HOSTS", '["hooks.example.org", "169.254.169.254", "127.0.0.1"]')
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer(make_token(database_url))) as c:
        r = c.post("/v1/jobs", json={**job_body(sae_id), "webhook": hook})
        assert r.status_code == 202, r.text
        assert r.json()["request"]["webhook"] == {"url": hook["url"], "secret": "***"}
        assert SECRET not in c.get(f"/v1/jobs/{r.json()['id']}").text and SECRET not in c.get("/v1/jobs").text
        whsec = {**hook, "secret": "whsec_" + base64.b64encode(bytes(24)).decode()}
        assert c.post("/v1/jobs", json={**job_body(sae_id), "webhook": whsec}).status_code == 202
        for bad, field in (
            ({**hook, "url": "https://evil.example.net/"}, "webhook.url"),
            ({**hook, "url": "file:///etc/passwd"}, "webhook.url"),
            ({**hook, "url": "https://hooks.example.org:8443/rsae"}, "webhook.url"),
            ({**hook, "url": "http://hooks.example.org:99999/rsae"}, "webhook.url"),
            ({**hook, "url": "http://169.254.169.254/latest/meta-data/"}, "webhook.url"),
            ({**hook, "url": "http://127.0.0.1/"}, "webhook.url"),
            ({**hook, "secret": "short"}, "webhook.secret"),
            ({**hook, "secret": "whsec_not base64 at all!!"}, "webhook.secret"),
            ({**hook, "secret": "whsec_" + base64.b64encode(b"tiny").decode()}, "webhook.secret"),
            ({"url": hook["url"]}, "webhook.secret"),
        ):
            body = assert_problem(c.post("/v1/jobs", json={**job_body(sae_id), "webhook": bad}), 422, field=field)
            assert SECRET not in json.dumps(body)


def _events(c: TestClient, job_id: str, deadline: float) -> list[dict]:
    while time.monotonic() < deadline:
        logs = [e["data"] for e in c.get(f"/v1/jobs/{job_id}/events").json()["data"] if e["type"] == "log"]
        if logs:
            return logs
        time.sleep(0.1)
    return []


def test_cancelling_a_queued_job_sends_its_webhook(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    make_teacher: Callable[..., Path],
    receiver: Receiver,
    db: Session,
) -> None:
    """Cancel (an API-side terminal transition): outbox row in the same commit, sent at once, signed."""
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_HOSTS", '["127.0.0.1"]')
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_PORTS", f"[{receiver.port}]")
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_NETWORKS", '["127.0.0.1/32"]')
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer(make_token(database_url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        job = c.post("/v1/jobs", json={**job_body(sae_id), "webhook": {"url": receiver.url, "secret": SECRET}}).json()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        logs = _events(c, job["id"], time.monotonic() + 30)
        assert [entry["webhook"] for entry in logs] == ["delivered"], logs
        assert len(receiver.received) == 1
        headers, body = receiver.received[0]
        assert verify(SECRET, headers, body)
        notice = json.loads(body)
        assert notice["type"] == "job.finished" and notice["job"]["status"] == "cancelled"
        assert notice["job"]["id"] == job["id"] and notice["job"]["finished_at"].endswith("Z")
        assert SECRET.encode() not in body
        row = db.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"])).one()
        assert (row.id, row.state, row.attempts, row.last_outcome) == (
            logs[0]["webhook_id"],
            "delivered",
            1,
            "delivered",
        )
        assert headers["webhook-id"] == row.id


def test_a_name_resolving_to_loopback_is_refused_with_a_generic_event(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    make_teacher: Callable[..., Path],
    receiver: Receiver,
) -> None:
    """'localhost' is allow-listed by name (accepted at submission); at delivery it resolves to loopback,
    which no allowed network covers: refused, never retried, and the event names no address or error."""
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_HOSTS", '["localhost"]')
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_PORTS", f"[{receiver.port}]")
    get_settings.cache_clear()
    url = f"http://localhost:{receiver.port}/hook"
    with TestClient(create_app(), headers=bearer(make_token(database_url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        job = c.post("/v1/jobs", json={**job_body(sae_id), "webhook": {"url": url, "secret": SECRET}}).json()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        logs = _events(c, job["id"], time.monotonic() + 30)
    assert [(e["message"], e["webhook"]) for e in logs] == [("webhook refused: address not allowed", "refused")]
    assert "127.0.0.1" not in json.dumps(logs) and "::1" not in json.dumps(logs)
    assert receiver.received == []
    assert deliver_due(get_settings(), get_sessionmaker(database_url)).outcomes == {}  # final: not retried


# -- the outbox -----------------------------------------------------------------------------------------
@pytest.fixture(params=["postgres", "sqlite"])
def outbox(
    request: pytest.FixtureRequest, database_url: str, clean_db: None, tmp_path: Path, receiver: Receiver
) -> tuple[Settings, sessionmaker[Session]]:
    """Settings letting notices reach ``receiver`` with no backoff, on Postgres or a migrated SQLite file."""
    url = database_url if request.param == "postgres" else f"sqlite:///{tmp_path / 'rsae.db'}"
    if request.param == "sqlite":
        upgrade(url)
    s = Settings(
        database_url=url,
        data_dir=tmp_path / "data",
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_allowed_ports=[receiver.port],
        webhook_allowed_networks=["127.0.0.1/32"],
        webhook_backoff_seconds=0,
    )
    return s, get_sessionmaker(url)


def _finished_job(settings: Settings, make_session: sessionmaker[Session], url: str) -> str:
    """A job with a webhook, claimed and failed by the worker's own terminal write (``_finish``) and then
    abandoned, as by a worker that died right after that commit: no delivery was attempted."""
    with make_session.begin() as s:
        job = Job(
            status="queued",
            progress=0.0,
            attempt=0,
            request={"model": "m", "layer": 0, "webhook": {"url": url, "secret": SECRET}},
        )
        s.add(job)
        s.flush()
        job_id = job.id
    owner = new_owner()
    assert claim(make_session, job_id, owner, settings) is not None
    assert _finish(make_session, settings, job_id, owner, "failed", error={"code": "x", "detail": "y", "field": None})
    return job_id


def _delivery(make_session: sessionmaker[Session], job_id: str) -> WebhookDelivery:
    with make_session() as s:
        return s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).one()


def _webhook_events(make_session: sessionmaker[Session], job_id: str) -> list[dict]:
    with make_session() as s:
        q = select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "log").order_by(JobEvent.id)
        return [d for d in s.scalars(q) if "webhook" in d]


def test_reaper_delivers_a_notice_a_dead_worker_left_at_least_once_with_a_stable_id(
    outbox: tuple[Settings, sessionmaker[Session]], receiver: Receiver
) -> None:
    settings, make_session = outbox
    job_id = _finished_job(settings, make_session, receiver.url)
    row = _delivery(make_session, job_id)
    assert (row.state, row.attempts) == ("pending", 0) and receiver.received == []
    job = json.loads(row.payload)["job"]
    assert (job["id"], job["status"], job["error"]["code"]) == (job_id, "failed", "x")

    receiver.statuses = [503]
    publish = lambda job_id: None  # noqa: E731 - nothing is queued here
    assert reap_once(settings, make_session, publish).webhooks == {row.id: "attempt 1 failed"}
    assert _delivery(make_session, job_id).state == "pending" and _webhook_events(make_session, job_id) == []
    assert reap_once(settings, make_session, publish).webhooks == {row.id: "delivered"}
    assert reap_once(settings, make_session, publish).webhooks == {}  # delivered: never again
    assert [h["webhook-id"] for h, _ in receiver.received] == [row.id, row.id]
    assert receiver.received[0][1] == receiver.received[1][1] == row.payload.encode()
    assert all(verify(SECRET, h, b) for h, b in receiver.received[1:])
    done = _delivery(make_session, job_id)
    assert (done.state, done.attempts, done.last_outcome) == ("delivered", 2, "delivered")
    assert _webhook_events(make_session, job_id) == [
        {"message": "webhook delivered", "webhook": "delivered", "webhook_id": row.id, "attempts": 2}
    ]


def test_retries_back_off_then_give_up_after_the_retry_window(
    outbox: tuple[Settings, sessionmaker[Session]], receiver: Receiver
) -> None:
    settings, make_session = outbox
    settings.webhook_backoff_seconds = 10
    job_id = _finished_job(settings, make_session, receiver.url)
    row = _delivery(make_session, job_id)
    receiver.statuses = [503] * 10
    t0 = utcnow()
    assert deliver_due(settings, make_session, now=t0).outcomes == {row.id: "attempt 1 failed"}
    assert deliver_due(settings, make_session, now=t0 + timedelta(seconds=9)).outcomes == {}  # not due yet
    assert deliver_due(settings, make_session, now=t0 + timedelta(seconds=11)).outcomes == {row.id: "attempt 2 failed"}
    assert _delivery(make_session, job_id).next_attempt_at >= t0 + timedelta(seconds=31)  # 10 s, then 20 s
    late = t0 + timedelta(seconds=settings.webhook_retry_seconds + 60)
    assert deliver_due(settings, make_session, now=late).outcomes == {row.id: "failed after 3 attempts"}
    assert deliver_due(settings, make_session, now=late + timedelta(days=1)).outcomes == {}
    assert len(receiver.received) == 3
    (event,) = _webhook_events(make_session, job_id)
    assert event["message"] == "webhook failed after 3 attempts" and event["webhook"] == "failed"
    assert "503" not in json.dumps(event)  # the per-attempt detail is in the logs only


def test_a_claimed_notice_is_sent_by_one_deliverer_and_retaken_after_a_crash(
    outbox: tuple[Settings, sessionmaker[Session]], receiver: Receiver
) -> None:
    settings, make_session = outbox
    job_id = _finished_job(settings, make_session, receiver.url)
    row = _delivery(make_session, job_id)
    now = utcnow()
    threads = [
        threading.Thread(target=deliver_due, args=(settings, make_session), kwargs={"now": now}) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [h["webhook-id"] for h, _ in receiver.received] == [row.id]
    # A deliverer that dies after its claim leaves the row claimed; it is due again after the claim time.
    with make_session.begin() as s:
        d = s.get(WebhookDelivery, row.id)
        d.state, d.next_attempt_at = "pending", now + timedelta(seconds=60)
    assert deliver_due(settings, make_session, now=now + timedelta(seconds=30)).outcomes == {}
    assert deliver_due(settings, make_session, now=now + timedelta(seconds=61)).outcomes == {row.id: "delivered"}
    assert [h["webhook-id"] for h, _ in receiver.received] == [row.id, row.id]


def test_a_job_without_a_webhook_gets_no_outbox_row(outbox: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, make_session = outbox
    with make_session.begin() as s:
        job = Job(status="queued", progress=0.0, attempt=0, request={"model": "m", "layer": 0})
        s.add(job)
    owner = new_owner()
    assert claim(make_session, job.id, owner, settings) is not None
    assert _finish(make_session, settings, job.id, owner, "cancelled")
    with make_session() as s:
        assert s.scalars(select(WebhookDelivery)).all() == []
