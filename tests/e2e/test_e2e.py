"""End to end over HTTP: a real uvicorn subprocess, a real Celery worker subprocess (prefork, queue
``gpu``), Redis db 14 and the test Postgres database. Nothing is mocked.

Run: ``pytest -m e2e tests/test_e2e.py``. The full upgrade test trains a tiny teacher on the bundled
SmolLM2-135M and takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.client import download_artifacts, get_job, submit_job, upload_sae, wait_for_job
from service.embedded import Stack, wait_until
from service.models import Job, User, utcnow
from service.queue import create_celery, enqueue_upgrade

pytestmark = pytest.mark.e2e

JOB_TIMEOUT = 8 * 60
SMALL_SETTINGS = {
    "data": {"train_tokens": 8192, "eval_tokens": 2048, "ctx_len": 64},
    "calibrate": {"steps": 50, "tokens": 2048},
    "finetune": {"steps": 60, "batch_size": 512, "eval_every": 30},
    "eval": {"ce_sequences": 4},
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ReLU teacher trained on real SmolLM2 layer-3 activations (once per module)."""
    from rsae.teacher import train_teacher_from_text

    return Path(
        train_teacher_from_text(
            model="smollm2-135m",
            layer=3,
            out=tmp_path_factory.mktemp("teacher"),
            d_sae=1152,
            train_tokens=8192,
            steps=300,
            seed=0,
        )
    )


def test_worker_records_failure_and_ignores_duplicate_messages(stack: Stack, http: httpx.Client, db: Session) -> None:
    """The real worker claims the row, fails it with the core's error (no numerical work needed: the
    teacher id resolves to nothing), and a redelivered message for a finished job is a no-op. The job's
    webhook notice, queued in the worker's terminal transaction, reaches a real receiver once, signed."""
    from service.webhooks import verify
    from support.webhooks import Receiver

    alice = db.scalar(select(User.id).where(User.name == "alice"))
    hook = Receiver(port=stack.settings.webhook_allowed_ports[0])
    job = Job(
        status="queued",
        progress=0.0,
        attempt=0,
        created_at=utcnow(),
        updated_at=utcnow(),
        owner_id=alice,
        request={
            "model": "smollm2-135m",
            "layer": 3,
            "teacher": {"sae_id": "deleted-sae"},
            "webhook": {"url": hook.url, "secret": WEBHOOK_SECRET},
        },
    )
    db.add(job)
    db.commit()
    celery = create_celery(stack.settings)
    try:
        enqueue_upgrade(celery, job.id)
        done = wait_for_job(http, job.id, timeout=120, interval=0.5)
        assert done["status"] == "failed" and done["attempt"] == 1
        assert done.error.model_dump() == {
            "code": "invalid_teacher",
            "field": "teacher.sae_id",
            "detail": done.error.detail,
        }
        assert done["started_at"] and done["finished_at"] >= done["started_at"]
        events = http.get(f"/v1/jobs/{job.id}/events").json()["data"]
        assert [e["data"].get("status") for e in events if e["type"] == "status"] == ["running", "failed"]
        enqueue_upgrade(celery, job.id)  # duplicate delivery
        worker = next(c for c in stack.children if c.name == "worker")
        wait_until(lambda: f"job {job.id} is not queued" in worker.tail(200), 60, "duplicate skipped")
        again = get_job(http, job.id)
        assert (again.status, again.attempt, again.updated_at) == ("failed", 1, done.updated_at)
        wait_until(lambda: hook.received, 30, "webhook delivered")
        (headers, body), *more = hook.received
        assert not more and verify(WEBHOOK_SECRET, headers, body)
        assert json.loads(body)["job"]["error"]["code"] == "invalid_teacher"
        logs = [e["data"] for e in http.get(f"/v1/jobs/{job.id}/events").json()["data"] if e["type"] == "log"]
        assert [d["webhook"] for d in logs if "webhook" in d] == ["delivered"]
    finally:
        celery.close()
        hook.server.shutdown()


def _recompute_heldout_mse(sae_folder: Path, report: dict[str, Any], work: Path) -> float:
    """Held-out MSE of the downloaded SAE, recomputed from scratch in this process.

    The held-out activations are extracted again with :mod:`rsae.activations` from the split described by
    ``report["eval_split"]`` (same model, layer, dataset, eval fraction, seed, context length, token
    count), independently of the worker's scratch files, and the SAE is loaded with ``rsae.load``.
    """
    import rsae
    from rsae.activations import ActivationStore, extract_activations
    from rsae.evaluate import reconstruction_metrics
    from rsae.models import load_model

    split = report["eval_split"]
    model, tok = load_model(split["model"])
    extract_activations(
        model,
        tok,
        layer=split["layer"],
        dataset=split["dataset"],
        split="eval",
        n_tokens=split["eval_tokens"],
        out_dir=work,
        ctx_len=split["ctx_len"],
        eval_fraction=split["eval_fraction"],
        seed=split["seed"],
    )
    store = ActivationStore(work)
    return reconstruction_metrics(rsae.load(sae_folder), [store.load()])["mse"]


def _submit_small_job(http: httpx.Client, teacher_dir: Path) -> dict[str, Any]:
    sae = upload_sae(http, teacher_dir, name="e2e-teacher")
    assert (sae["family"], sae["d_in"], sae["d_sae"]) == ("relu", 576, 1152)
    return submit_job(
        http, {"model": "smollm2-135m", "layer": 3, "teacher": {"sae_id": sae["id"]}, "settings": SMALL_SETTINGS}
    )


@pytest.mark.slow
def test_cancel_a_running_job(stack: Stack, http: httpx.Client, teacher_dir: Path) -> None:
    """A running job stops at the worker's next cancellation check and ends cancelled, without artifacts."""
    job = _submit_small_job(http, teacher_dir)
    deadline = time.monotonic() + 120
    while (j := http.get(f"/v1/jobs/{job['id']}").json())["status"] != "running" or j["stage"] is None:
        assert j["status"] in ("queued", "running") and time.monotonic() < deadline, j
        time.sleep(0.2)
    assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
    done = wait_for_job(http, job["id"], timeout=JOB_TIMEOUT, interval=0.5)
    assert done["status"] == "cancelled" and done["artifacts"] == [] and done["error"] is None
    assert not (stack.settings.work_dir / job["id"]).exists()
    assert not (stack.settings.artifacts_dir / job["id"]).exists()
    statuses = [
        e["data"]["status"]
        for e in http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
        if e["type"] == "status"
    ]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]


@pytest.mark.slow
def test_full_upgrade_over_http(stack: Stack, http: httpx.Client, teacher_dir: Path, tmp_path: Path) -> None:
    """Upload the teacher, run a small upgrade through the worker, download the result and check it."""
    import rsae

    job = _submit_small_job(http, teacher_dir)
    seen: list[tuple[str | None, float]] = []
    done = wait_for_job(
        http, job["id"], timeout=JOB_TIMEOUT, interval=0.5, on_update=lambda j: seen.append((j["stage"], j["progress"]))
    )
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0 and done["attempt"] == 1, done
    assert len({stage for stage, _ in seen if stage}) >= 2, seen  # the stage moved while we polled
    assert len({p for _, p in seen}) >= 3, seen  # and so did the progress
    assert not (stack.settings.work_dir / job["id"]).exists()  # scratch deleted

    events = http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert {"status", "progress", "metrics"} <= {e["type"] for e in events}, events

    listing = http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert {"sae_weights.safetensors", "cfg.json", "report.json", "report.html"} <= {a["name"] for a in listing}, (
        listing
    )
    folder = tmp_path / "download"
    paths = download_artifacts(http, done, folder)  # checks size and sha256 against the listing
    for art in listing:
        assert hashlib.sha256(paths[art["name"]].read_bytes()).hexdigest() == art["sha256"]

    report = json.loads(paths["report.json"].read_text())
    assert done["metrics"]["rsae_mse"] == pytest.approx(report["headline"]["rsae_mse"]), done["metrics"]
    assert {"teacher", "rsae_init", "rsae", "control"} <= report["metrics"].keys()
    model = rsae.load(folder)
    assert type(model).__name__ == "RationalSAE", type(model)
    x = torch.randn(4, 576)
    z = model.encode(x)
    assert z.shape == (4, 1152) and torch.isfinite(model.decode(z)).all()
    assert torch.allclose(model(x), model.decode(z))
    mse = _recompute_heldout_mse(folder, report, tmp_path / "heldout")
    assert mse == pytest.approx(report["metrics"]["rsae"]["mse"], rel=1e-3), (mse, report["metrics"]["rsae"])


# -- clients: README flows, the CLI and the SSE stream ------------------------------------------------
TINY_SETTINGS = {
    "data": {"train_tokens": 4096, "eval_tokens": 1024, "ctx_len": 64},
    "calibrate": {"steps": 20, "tokens": 1024},
    "finetune": {"steps": 20, "batch_size": 256, "eval_every": 10, "control": False},
    "eval": {"ce_sequences": 2, "probe_ks": []},
}
"""The smallest useful job (about half a minute here): for testing the clients, not the method."""
README = Path(__file__).resolve().parents[2] / "README.md"
WEBHOOK_SECRET = "e2e-webhook-secret-value"
VENV_BIN = Path(sys.executable).parent


def readme_block(kind: str) -> str:
    """The fenced code block right after ``<!-- readme-test: kind -->`` in README.md."""
    text = README.read_text()
    start = text.index(f"<!-- readme-test: {kind} -->")
    body = text[text.index("\n", text.index("```", start)) + 1 :]
    return body[: body.index("```")]


def _client_env(stack: Stack, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "RSAE_URL": stack.base_url,
        "RSAE_DATABASE_URL": stack.settings.database_url,
        **extra,
    }


@pytest.mark.slow
def test_readme_curl_flow(stack: Stack, teacher_dir: Path, tmp_path: Path) -> None:
    """README's curl block, verbatim except the server address and a smaller job body, succeeds."""
    block = readme_block("curl").replace("http://127.0.0.1:8000", stack.base_url)
    body_line = next(line for line in block.splitlines() if line.startswith("BODY="))
    block = block.replace(
        body_line, "BODY=" + shlex.quote(json.dumps({"model": "smollm2-135m", "layer": 3, "settings": TINY_SETTINGS}))
    )
    (tmp_path / "teacher").symlink_to(teacher_dir)
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_client_env(stack, USER="readme-curl"),
        timeout=JOB_TIMEOUT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "event: status" in run.stdout and '"status":"succeeded"' in run.stdout, run.stdout[-2000:]
    assert run.stdout.rstrip().endswith("succeeded")  # cancel of a finished job leaves it as it is
    cfg = json.loads((tmp_path / "upgraded" / "cfg.json").read_text())
    assert cfg["architecture"] == "rational"
    assert (tmp_path / "upgraded" / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


@pytest.mark.slow
def test_readme_python_flow(
    stack: Stack,
    teacher_dir: Path,
    tmp_path: Path,
    api_token: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README's Python block, verbatim except the server address and a smaller job body, succeeds."""
    block = readme_block("python").replace("http://127.0.0.1:8000", stack.base_url)
    body_line = next(line for line in block.splitlines() if line.strip().startswith("body = "))
    block = block.replace(
        body_line.strip(), "body = " + repr({"model": "smollm2-135m", "layer": 3, "settings": TINY_SETTINGS})
    )
    (tmp_path / "teacher").symlink_to(teacher_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSAE_TOKEN", api_token)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md[python]", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["job"]["status"] == "succeeded", namespace["job"]
    printed = capsys.readouterr().out
    assert "status {'status': 'succeeded'}" in printed and "progress {" in printed, printed[-2000:]
    model = namespace["upgraded"]
    assert type(model).__name__ == "RationalSAE"
    x = torch.randn(3, 576)
    assert torch.allclose(model(x), model.decode(model.encode(x)))


@pytest.mark.slow
def test_cli_and_server_sent_events(
    stack: Stack, http: httpx.Client, teacher_dir: Path, tmp_path: Path, api_token: str
) -> None:
    """``rsae jobs`` submit / wait / status / download / cancel against the stack, while a second client
    follows the same job's SSE stream; the stream resumes exactly after ``Last-Event-ID``; the worker
    sends the job's signed webhook to a real local receiver."""
    from service.client import stream_events
    from service.webhooks import verify
    from support.webhooks import Receiver

    env = _client_env(stack, RSAE_TOKEN=api_token)
    rsae_cli = [str(VENV_BIN / "rsae"), "jobs"]
    hook = Receiver(port=stack.settings.webhook_allowed_ports[0])
    out = subprocess.run(
        [
            *rsae_cli,
            "submit",
            "--teacher",
            str(teacher_dir),
            "--layer",
            "3",
            "--settings",
            json.dumps(TINY_SETTINGS),
            "--idempotency-key",
            "cli-1",
            "--webhook-url",
            hook.url,
            "--webhook-secret",
            WEBHOOK_SECRET,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["id"]

    streamed: list[dict[str, Any]] = []
    follower = threading.Thread(target=lambda: streamed.extend(stream_events(http, job_id, timeout=JOB_TIMEOUT)))
    follower.start()
    waited = subprocess.run([*rsae_cli, "wait", job_id], env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    follower.join(timeout=60)
    assert waited.returncode == 0, waited.stderr
    assert f"job {job_id} succeeded" in waited.stderr and "100%" in waited.stderr, waited.stderr[-2000:]

    # The stream delivered every event once, in order, from 'queued' to 'succeeded', then closed.
    # (After the terminal status only 'log' events can follow: the webhook's delivery record.)
    listed = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    end = next(i for i, e in enumerate(listed) if e["data"].get("status") == "succeeded")
    assert [e["id"] for e in streamed][: end + 1] == [e["id"] for e in listed][: end + 1]
    assert all(e["type"] == "log" for e in streamed[end + 1 :] + listed[end + 1 :])
    assert streamed[0]["data"] == {"status": "queued"}
    progress = [e["data"]["progress"] for e in streamed if e["type"] == "progress"]
    assert progress == sorted(progress) and len(progress) >= 3
    # Resumption: Last-Event-ID = a middle event -> exactly the later ones.
    middle = listed[len(listed) // 2]["id"]
    with http.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": str(middle)}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        ids = [int(line[3:].strip()) for line in r.iter_lines() if line.startswith("id:")]
    assert ids == [e["id"] for e in listed if e["id"] > middle]

    status = subprocess.run(
        [*rsae_cli, "status", job_id, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(status.stdout)["status"] == "succeeded"
    down = subprocess.run(
        [*rsae_cli, "download", job_id, "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0 and (tmp_path / "out" / "sae_weights.safetensors").is_file(), down.stderr
    # The job's RSAE loads through SAELens's own loader ("rational" architecture registered by rsae).
    from sae_lens import SAE as SAELensSAE

    import rsae
    import rsae.saelens_arch  # noqa: F401 - registers the architecture

    ours, theirs = rsae.load(tmp_path / "out"), SAELensSAE.load_from_disk(str(tmp_path / "out"))
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(5, 576)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["metadata"]["teacher"]["sha256"] and cfg["metadata"]["versions"]["torch"]
    again = subprocess.run(
        [
            *rsae_cli,
            "submit",
            "--sae-id",
            json.loads(status.stdout)["request"]["teacher"]["sae_id"],
            "--layer",
            "3",
            "--settings",
            json.dumps(TINY_SETTINGS),
            "--idempotency-key",
            "cli-1",
            "--webhook-url",
            hook.url,
            "--webhook-secret",
            WEBHOOK_SECRET,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(again.stdout)["id"] == job_id  # same key, same body: the same job

    # The worker delivered one signed completion notice to the webhook receiver.
    wait_until(lambda: len(hook.received) == 1, 60, "webhook delivered")
    headers, body = hook.received[0]
    assert verify(WEBHOOK_SECRET, headers, body)
    assert json.loads(body)["job"]["id"] == job_id and json.loads(body)["job"]["status"] == "succeeded"
    hook.server.shutdown()
    cancel = subprocess.run([*rsae_cli, "cancel", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert cancel.stdout.strip() == f"job {job_id} succeeded"
    bad = subprocess.run([*rsae_cli, "status", "no-such-job"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "job_not_found" in bad.stderr
