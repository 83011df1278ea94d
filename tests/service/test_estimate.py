"""``POST /v1/jobs/estimate`` (issue 15) against the real API (Postgres + Redis), the worker's ``run_job`` in process
on the real model and text (as ``tests/service/test_bounds.py`` runs it), and the thin client and the CLI against a
real uvicorn server.

- bad bodies answer exactly the 422 that ``POST /v1/jobs`` answers;
- an estimate creates nothing (no job, no queued message, no quota slot, no storage);
- over a limit: 200 with ``allowed_to_proceed`` false and the problems ``POST /v1/jobs`` answers;
- after a real job has run, each stage's basis is the throughput the worker recorded, and the estimate of the
  same body gives back the recorded seconds;
- ``RSAEClient.estimate`` / ``AsyncRSAEClient.estimate`` and ``rsae jobs submit --estimate-only`` / the question
  over ``--confirm-over``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rsae.cost import JobSizes, stage_work
from rsae_client import ApiError, AsyncRSAEClient, RSAEClient
from service.app import create_app
from service.config import Settings, get_settings
from service.estimate import MIN_STAGE_SECONDS
from service.models import Job, Sae
from service.storage import storage_usage
from support.servers import assert_problem, bearer, job_body, make_token, queued_messages, served

SMALL = {
    "data": {"train_tokens": 2048, "eval_tokens": 512, "ctx_len": 32},
    "calibrate": {"steps": 10, "tokens": 512},
    "finetune": {"steps": 40, "batch_size": 256, "eval_every": 20},
    "eval": {"ce_sequences": 2, "probe_ks": [], "probe_train_sequences": 0},
}
"""A real job of a few seconds' compute beside the model's loading and the extraction (control and CE on, so
every stage runs)."""

STAGES = ["extract", "init", "calibrate", "finetune", "evaluate", "package"]


def fresh_app(monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    """A TestClient of an app created after setting ``RSAE_<KEY>`` variables, as ``alice``."""
    for k, v in env.items():
        monkeypatch.setenv(f"RSAE_{k.upper()}", v)
    get_settings.cache_clear()
    return TestClient(create_app(), headers=bearer(make_token(get_settings().database_url)))


def jobs_count(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(Job))


def test_bad_bodies_answer_as_post_jobs(client: TestClient, sae_id: str) -> None:
    """Every malformed body gets the very problem POST /v1/jobs answers (status, code, field, detail)."""
    bodies: list[Any] = [
        {**job_body(sae_id), "surprise": 1},  # unknown field
        {**job_body(sae_id), "layer": "three"},  # wrong type
        job_body(sae_id, finetune={"steps": -1}),  # the core's bounds
        job_body(sae_id, data={"train_tokens": 100}),
        {**job_body(sae_id), "layer": 99},  # no such block
        {**job_body(sae_id), "teacher": {"sae_id": "00000000-0000-4000-8000-000000000000"}},  # unknown teacher
        {**job_body(sae_id), "teacher": {}},  # neither teacher kind
        {**job_body(sae_id), "metadata": {"bad key!": "x"}},
        {**job_body(sae_id), "model": ""},
        {**job_body(sae_id), "hook": "blocks.3.hook_nowhere"},
        [1, 2],
    ]
    for body in bodies:
        job = client.post("/v1/jobs", json=body)
        est = client.post("/v1/jobs/estimate", json=body)
        assert job.status_code == 422, (body, job.text)
        got = assert_problem(est, 422)
        assert got.pop("instance") == "/v1/jobs/estimate"
        assert got == {k: v for k, v in job.json().items() if k != "instance"}, body
    for raw in (b"{not json", b'{"model": "a", "model": "b"}'):
        headers = {"content-type": "application/json"}
        job = client.post("/v1/jobs", content=raw, headers=headers)
        est = client.post("/v1/jobs/estimate", content=raw, headers=headers)
        assert job.status_code in (400, 422) and est.status_code == job.status_code
        assert {**est.json(), "instance": None} == {**job.json(), "instance": None}


def test_estimate_creates_nothing(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    db: Session,
    make_teacher: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No job row, no message, no slot of the active-job quota, no storage; the figures follow the request."""
    with fresh_app(monkeypatch, max_active_jobs_per_user="1") as c:
        sae = c.post(
            "/v1/saes",
            files={
                "cfg": ("cfg.json", (make_teacher() / "cfg.json").read_bytes(), "application/json"),
                "weights": (
                    "sae_weights.safetensors",
                    (make_teacher() / "sae_weights.safetensors").read_bytes(),
                    "application/octet-stream",
                ),
            },
        ).json()
        user_id = db.scalar(select(Sae.owner_id).where(Sae.id == sae["id"]))
        before = storage_usage(db, settings, user_id)
        body = job_body(sae["id"], data={"train_tokens": 4096, "eval_tokens": 1024}, finetune={"steps": 30})
        for _ in range(3):
            r = c.post("/v1/jobs/estimate", json=body, headers={"Idempotency-Key": "not-a-job"})
            assert r.status_code == 200, r.text
        est = r.json()
        assert jobs_count(db) == 0 and queued_messages(broker) == []
        db.expire_all()
        assert storage_usage(db, settings, user_id) == before
        assert est["allowed_to_proceed"] is True and est["limits_exceeded"] == [] and est["device"] == "cpu"
        assert est["tokens"] == {
            "train": 4096,
            "eval": 1024,
            "finetune_rows": 30 * 1024,
            "calibrate": 4096,
            "ce": 64 * 128,
        }
        assert est["disk"] == {"activations_bytes": (4096 + 1024) * 576 * 4, "artifacts_bytes": 8 * 576 * 64 + 2**20}
        assert [s["stage"] for s in est["stages"]] == STAGES
        assert all(s["basis"]["source"] == "default" and s["seconds"] > 0 for s in est["stages"])
        assert est["total_seconds"] == pytest.approx(sum(s["seconds"] for s in est["stages"]), abs=0.05)
        host = est["memory"]["host_bytes"]
        assert 134_515_008 * 4 < host < 4 * 1024**3 and est["memory"]["accelerator_bytes"] is None
        # more fine-tuning steps: more fine-tuning seconds, nothing else changes
        more = job_body(sae["id"], data=body["settings"]["data"], finetune={"steps": 300})
        more = c.post("/v1/jobs/estimate", json=more).json()
        assert (
            more["stages"][3]["work"] == 10 * est["stages"][3]["work"]
            and more["stages"][3]["seconds"] > est["stages"][3]["seconds"]
        )
        assert [s for i, s in enumerate(more["stages"]) if i != 3] == [s for i, s in enumerate(est["stages"]) if i != 3]
        # the estimate took no slot: the one job this user may have is accepted, and then the quota is full
        assert c.post("/v1/jobs", json=body).status_code == 202
        full = c.post("/v1/jobs/estimate", json=body).json()
    assert full["allowed_to_proceed"] is False
    assert [(p["status"], p["code"]) for p in full["limits_exceeded"]] == [(429, "too_many_jobs")]
    assert jobs_count(db) == 1


def test_over_budget_lists_the_limits(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    db: Session,
    make_teacher: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over the token and disk budgets and the storage quota: 200, not allowed, each limit with the status, code,
    field and detail POST /v1/jobs answers; POST /v1/jobs refuses it with the first."""
    from service.client import upload_sae

    with fresh_app(
        monkeypatch,
        max_train_tokens="100000",
        max_job_disk_bytes=str(200 * 2**20),
        max_storage_bytes_per_user="2000000",
    ) as c:
        sae_id = upload_sae(c, make_teacher(d_sae=256))["id"]
        body = job_body(sae_id, data={"train_tokens": 131072})
        est = c.post("/v1/jobs/estimate", json=body)
        assert est.status_code == 200, est.text
        est = est.json()
        job = assert_problem(c.post("/v1/jobs", json=body), 422, code="token_budget_exceeded")
        assert jobs_count(db) == 0
    assert est["allowed_to_proceed"] is False
    limits = est["limits_exceeded"]
    assert [(p["status"], p["code"], p["field"]) for p in limits] == [
        (422, "token_budget_exceeded", "settings.data.train_tokens"),
        (422, "disk_budget_exceeded", "settings.data.train_tokens"),
        (413, "storage_quota_exceeded", "body"),
    ]
    assert limits[0]["detail"] == job["detail"]
    assert (
        limits[2]["extra"]["limit_bytes"] == 2000000 and limits[2]["extra"]["requested_bytes"] == 8 * 576 * 256 + 2**20
    )
    assert est["stages"][0]["seconds"] > 0  # still estimated


def test_deadline_warning(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    make_teacher: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job expected to run past RSAE_JOB_DEADLINE_SECONDS is still allowed, with a warning naming the deadline."""
    from service.client import upload_sae

    with fresh_app(monkeypatch, job_deadline_seconds="60") as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        est = c.post("/v1/jobs/estimate", json=job_body(sae_id, finetune={"steps": 100_000})).json()
    assert est["allowed_to_proceed"] is True and est["total_seconds"] > 60
    (warning,) = est["warnings"]
    assert (
        warning["code"] == "deadline_exceeded"
        and warning["status"] is None
        and "RSAE_JOB_DEADLINE_SECONDS" in warning["detail"]
    )


def test_basis_switches_to_recorded_throughput(
    settings: Settings,
    api_token: str,
    broker: redis.Redis,
    db: Session,
    make_teacher: Callable[..., Path],
) -> None:
    """After a real job (the worker's run_job in process, real model and text), every stage's basis is what the
    worker recorded on this device, and the estimate of the same body gives back the recorded seconds. The
    clients and the CLI read the same estimate from a real server."""
    from worker.tasks import run_job

    with served(settings) as url, RSAEClient(url, api_token) as c:
        sae = c.upload_sae(make_teacher(d_sae=128), name="estimate")
        body = job_body(sae.id, **SMALL)
        before = c.estimate(body)
        assert {s.basis.source for s in before.stages} == {"default"}
        job = c.create_job(body)
        assert run_job(job.id, settings) == "succeeded"
        done = c.get_job(job.id)
        rec = done.metrics["throughput"]
        after = c.estimate(body)
        async_after = asyncio.run(_async_estimate(url, api_token, body))
        with pytest.raises(ApiError) as bad:
            c.estimate(job_body(sae.id, finetune={"steps": -1}))
        submit = ("jobs", "submit", "--url", url, "--token", api_token, "--sae-id", sae.id, "--layer", "3")
        submit += ("--settings", json.dumps(SMALL))
        cli_json = _cli(
            *submit,
            "--estimate-only",
            "--json",
        )
        cli_text = _cli(
            *submit,
            "--confirm-over",
            "0",
            stdin="n\n",
        )
        n_jobs = jobs_count(db)
        cli_yes = _cli(
            *submit,
            "--confirm-over",
            "0",
            stdin="y\n",
        )
    assert rec["device"] == "cpu" and rec["model"] == "smollm2-135m" and set(STAGES) <= set(rec["seconds"])
    assert rec["sizes"]["d_sae"] == 128 and rec["sizes"]["layer"] == 3 and rec["sizes"]["control"] is True
    work = stage_work(JobSizes.from_dict(rec["sizes"]))
    timed = {s for s, sec in rec["seconds"].items() if sec >= MIN_STAGE_SECONDS}
    assert {"extract", "finetune", "evaluate"} <= timed  # the long stages always give a rate
    for st in after.stages:
        if st.stage not in timed:  # too short to time (init on a fast machine): the documented default stays
            assert st.basis == before.stages[[b.stage for b in before.stages].index(st.stage)].basis, st
            continue
        assert st.basis.source == "measured" and st.basis.device == "cpu" and st.basis.jobs == 1, st
        assert st.basis.measured_at == done.finished_at
        assert st.basis.rate == pytest.approx(work[st.stage] / rec["seconds"][st.stage])
        # the same sizes at the recorded rate: the recorded time (train/eval rows as extracted = as requested)
        assert st.seconds == pytest.approx(rec["seconds"][st.stage], rel=0.02, abs=0.02), st
    assert after.device == "cpu" and async_after == after
    assert bad.value.status == 422 and bad.value.field == "settings.finetune.steps"
    code, out, err = cli_json
    assert code == 0 and json.loads(out)["stages"] == after.model_dump(mode="json")["stages"], err
    code, out, err = cli_text
    assert code == 1 and "not submitted" in err and "estimate on cpu" in err and "1 succeeded job(s) on cpu" in err
    assert n_jobs == 1  # the answer "n" submitted nothing
    code, out, err = cli_yes
    assert code == 0 and json.loads(out)["status"] == "queued", err
    assert jobs_count(db) == 2


async def _async_estimate(url: str, token: str, body: dict[str, Any]) -> Any:
    async with AsyncRSAEClient(url, token) as c:
        return await c.estimate(body)


class _Terminal(io.StringIO):
    """A standard input that says it is a terminal (the CLI asks its question only on one)."""

    def isatty(self) -> bool:
        return True


def _cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """``rsae ...`` in process: (exit code, stdout, stderr), with ``stdin`` typed at a terminal."""
    from rsae.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = _Terminal(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def test_hub_teacher_sizes_unknown(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub teacher's d_sae is known only to the worker: the stages that need it are 'unknown' with null seconds
    and total, the extraction (model and layer known) is still estimated; no artifacts figure for the quota."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    body = {"model": "smollm2-135m", "layer": 3, "teacher": {"hub": {"repo_id": "org/saes", "subfolder": "l3"}}}
    est = client.post("/v1/jobs/estimate", json=body)
    assert est.status_code == 200, est.text
    est = est.json()
    by_stage = {s["stage"]: s for s in est["stages"]}
    assert by_stage["extract"]["seconds"] > 0 and by_stage["calibrate"]["seconds"] > 0
    for stage in ("init", "finetune", "evaluate"):
        assert by_stage[stage]["seconds"] is None and by_stage[stage]["basis"]["source"] == "unknown"
    assert est["total_seconds"] is None and est["memory"]["host_bytes"] is None
    assert est["disk"] == {"activations_bytes": (131072 + 8192) * 576 * 4, "artifacts_bytes": None}
    assert est["allowed_to_proceed"] is True
