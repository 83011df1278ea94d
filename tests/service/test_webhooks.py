"""Completion webhooks: allow-listed hosts only, secrets never echoed, HMAC-signed and timestamped notices,
retries on transient failures, against a real local HTTP receiver."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import upload_sae
from service.config import Settings, get_settings
from service.webhooks import WebhookRefused, deliver, host_allowed, sign, verify
from support.servers import assert_problem, bearer, job_body, make_token
from support.webhooks import Receiver

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_delivery_is_signed_and_retried(receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    payload = {"type": "job.finished", "job": {"id": "j1", "status": "succeeded"}}
    assert deliver(receiver.url, SECRET, payload, attempts=4, backoff_max=0.2) == 200
    assert len(receiver.received) == 3
    ids = {h["RSAE-Webhook-Id"] for h, _ in receiver.received}
    assert len(ids) == 1  # one notice, retried: receivers can de-duplicate
    headers, body = receiver.received[-1]
    assert json.loads(body) == payload and verify(SECRET, headers, body)
    assert not verify("another-secret-value", headers, body)
    assert not verify(SECRET, headers, body + b" ")
    assert not verify(SECRET, headers, body, now=time.time() + 3600)  # replayed an hour later


def test_final_4xx_is_not_retried_and_exhaustion_raises(receiver: Receiver) -> None:
    receiver.statuses = [400]
    with pytest.raises(WebhookRefused):
        deliver(receiver.url, SECRET, {"x": 1}, attempts=4, backoff_max=0.1)
    assert len(receiver.received) == 1
    receiver.statuses = [502, 502, 502]
    with pytest.raises(Exception, match="answered 502"):  # the last attempt's error, re-raised
        deliver(receiver.url, SECRET, {"x": 1}, attempts=3, backoff_max=0.1)
    assert len(receiver.received) == 4


def test_signature_format() -> None:
    assert sign("k" * 16, 1700000000, b"{}").startswith("v1=") and len(sign("k" * 16, 1, b"")) == 67


@pytest.mark.parametrize(
    "url,ok",
    [
        ("https://hooks.example.org/x", True),
        ("https://a.internal.example.org/", True),
        ("https://example.org/x", False),
        ("ftp://hooks.example.org/", False),
        ("https://user:pw@hooks.example.org/", False),
        ("http://169.254.169.254/", False),
    ],
)
def test_host_allow_list(url: str, ok: bool) -> None:
    assert host_allowed(url, ["hooks.example.org", "*.internal.example.org"]) is ok


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
            c.post("/jobs", json={**job_body(sae_id), "webhook": hook}),
            422,
            field="webhook.url",
            code="webhook_not_allowed",
        )
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_HOSTS", '["hooks.example.org"]')
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer(make_token(database_url))) as c:
        r = c.post("/jobs", json={**job_body(sae_id), "webhook": hook})
        assert r.status_code == 202, r.text
        assert r.json()["request"]["webhook"] == {"url": hook["url"], "secret": "***"}
        assert SECRET not in c.get(f"/jobs/{r.json()['id']}").text and SECRET not in c.get("/jobs").text
        for bad in (
            {**hook, "url": "https://evil.example.net/"},
            {**hook, "url": "file:///etc/passwd"},
            {**hook, "secret": "short"},
            {"url": hook["url"]},
        ):
            assert_problem(c.post("/jobs", json={**job_body(sae_id), "webhook": bad}), 422)


def test_cancelling_a_queued_job_sends_its_webhook(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    make_teacher: Callable[..., Path],
    receiver: Receiver,
) -> None:
    monkeypatch.setenv("RSAE_WEBHOOK_ALLOWED_HOSTS", '["127.0.0.1"]')
    get_settings.cache_clear()
    with TestClient(create_app(), headers=bearer(make_token(database_url))) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        job = c.post("/jobs", json={**job_body(sae_id), "webhook": {"url": receiver.url, "secret": SECRET}}).json()
        assert c.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        deadline = time.monotonic() + 30
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
        headers, body = receiver.received[0]
        assert verify(SECRET, headers, body)
        notice = json.loads(body)
        assert notice["type"] == "job.finished" and notice["job"]["status"] == "cancelled"
        assert SECRET.encode() not in body
        while time.monotonic() < deadline:
            logs = [e["data"] for e in c.get(f"/jobs/{job['id']}/events").json() if e["type"] == "log"]
            if logs:
                break
            time.sleep(0.1)
        assert logs and logs[-1]["webhook"] == "delivered", logs
