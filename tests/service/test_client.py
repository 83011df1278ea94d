"""The thin client (``rsae_client``) and the API conventions of issue 15, against the real API (Postgres, Redis;
uvicorn where a separate process or an async client needs a socket):

- the client installs in a fresh venv without torch or numpy and drives the running API from there;
- retries: 429/503 honouring ``Retry-After``, connection errors, POST /v1/jobs re-sent with the same generated
  ``Idempotency-Key``, uploads never re-sent after a lost connection (an ``httpx.MockTransport`` plays the
  failing server here: these are the client's decisions, not the server's);
- the async twin; paginated iterators; uploads in the four teacher formats; the CLI (``--version``,
  ``--json``, ``--metadata``, hub flags);
- ``/v1`` with 308 from the old paths; one list envelope; operation ids; job ``metadata`` and its filter
  (Postgres and SQLite); ``GET /v1/jobs/{id}/checkpoints``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from rsae_client import ApiError, AsyncRSAEClient, RetryPolicy, RSAEClient, teacher_files
from rsae_client.formats import TEACHER_FORMATS
from rsae_client.models import JOB_EXAMPLE
from service.app import create_app
from service.config import Settings
from service.db import get_sessionmaker
from service.migrate import upgrade
from service.models import Job
from service.teachers import UPLOAD_FILES
from support.servers import assert_problem, bearer, job_body, make_token, served
from support.teachers import write_dictionary_learning, write_gemma_scope, write_sparsify
from worker.tasks import JobReporter

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.01)


# -- installation ------------------------------------------------------------------------------------------------
CLIENT_SCRIPT = """
import importlib.util, json, sys
missing = [m for m in ("torch", "numpy", "fastapi", "sqlalchemy") if importlib.util.find_spec(m) is None]
from rsae_client import RSAEClient
loaded = sorted(m for m in ("torch", "numpy", "rsae", "service", "worker") if m in sys.modules)
with RSAEClient(sys.argv[1], token=sys.argv[2]) as c:
    sae = c.upload_sae(sys.argv[3], name="from-venv")
    job = c.create_job(model="smollm2-135m", layer=3, teacher={"sae_id": sae.id}, metadata={"venv": "yes"})
    listed = [j.id for j in c.iter_jobs(metadata={"venv": "yes"})]
    cancelled = c.cancel_job(job.id)
print(json.dumps({"missing": missing, "loaded": loaded, "sae": sae.family, "job": job.id, "listed": listed,
                  "status": cancelled.status, "metadata": cancelled.metadata}))
"""


def test_client_installs_in_a_fresh_venv_without_torch_and_drives_the_api(
    settings: Settings, api_token: str, broker: redis.Redis, make_teacher: Callable[..., Path], tmp_path: Path
) -> None:
    """``python -m venv`` (no system site packages), the project without its dependencies plus the ``client``
    extra's: torch and numpy are not importable, and the client uploads, submits, lists and cancels (~30 s)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["client"]
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check"]
    for args in (["--no-deps", "-e", str(ROOT)], extra):
        done = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    teacher = make_teacher()
    with served(settings) as url:
        out = subprocess.run(
            [python, "-c", CLIENT_SCRIPT, url, api_token, str(teacher)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # not the repository root: only the installed packages are importable
        )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["missing"] == ["torch", "numpy", "fastapi", "sqlalchemy"] and got["loaded"] == []
    assert got["sae"] == "relu" and got["listed"] == [got["job"]]
    assert got["status"] == "cancelled" and got["metadata"] == {"venv": "yes"}


def test_the_client_and_the_server_agree_on_the_teacher_files() -> None:
    """The client's format table names the upload form fields and file names of the server."""
    for fields in TEACHER_FORMATS.values():
        for field, name in fields.items():
            assert UPLOAD_FILES[field] == name


# -- retries -----------------------------------------------------------------------------------------------------
class Script:
    """An ``httpx.MockTransport`` handler answering from a list: an int is a status (with the given
    Retry-After), an exception class is raised, anything else is the JSON of a 2xx."""

    def __init__(self, *answers: object, retry_after: str = "0") -> None:
        self.answers, self.retry_after, self.requests = list(answers), retry_after, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, type) and issubclass(answer, Exception):
            raise answer("scripted", request=request)
        if isinstance(answer, int):
            body = {"type": "about:blank", "title": "t", "status": answer, "detail": "later", "code": "x"}
            return httpx.Response(answer, json=body, headers={"Retry-After": self.retry_after})
        return httpx.Response(202 if request.method == "POST" else 200, json=answer)


def _job() -> dict:
    """A job object as the API answers it."""
    return dict(JOB_EXAMPLE)


def _mock_client(script: Script, policy: RetryPolicy = FAST) -> RSAEClient:
    return RSAEClient(http=httpx.Client(base_url="http://x", transport=httpx.MockTransport(script)), retry=policy)


def test_retries_honour_retry_after_and_resend_only_what_is_safe(tmp_path: Path, make_teacher) -> None:
    # 503 and 429 are retried; the job is created once, every try carrying the same generated Idempotency-Key.
    script = Script(503, 429, httpx.ReadError, _job())
    job = _mock_client(script).create_job(model="m", layer=3, teacher={"sae_id": "s"})
    assert job.id == _job()["id"] and len(script.requests) == 4
    keys = {r.headers["Idempotency-Key"] for r in script.requests}
    assert len(keys) == 1 and len(keys.pop()) == 36
    # A Retry-After beyond what the policy waits for: raised at once, with the server's figure.
    script = Script(429, retry_after="3600")
    with pytest.raises(ApiError) as e:
        _mock_client(script).get_job("j")
    assert (e.value.status, e.value.retry_after, len(script.requests)) == (429, 3600.0, 1)
    # Out of attempts: the last answer is raised.
    script = Script(503, 503, 503, 503)
    with pytest.raises(ApiError) as e:
        _mock_client(script).get_job("j")
    assert e.value.status == 503 and len(script.requests) == 4
    # An upload is re-sent when the connection was refused, never after it was lost mid-request.
    teacher = make_teacher()
    sae = {"id": "s", "name": None, "family": "relu", "architecture": "standard", "d_in": 576, "d_sae": 64}
    sae |= {"sha256": "0" * 64, "created_at": "2026-12-01T00:00:00Z"}
    script = Script(httpx.ConnectError, sae)
    assert _mock_client(script).upload_sae(teacher).id == "s" and len(script.requests) == 2
    assert script.requests[-1].content.count(b"sae_weights.safetensors") == 1  # files re-read for the retry
    script = Script(httpx.ReadError, sae)
    with pytest.raises(httpx.ReadError):
        _mock_client(script).upload_sae(teacher)
    assert len(script.requests) == 1
    # GET is re-sent after a lost connection; no retries with attempts=1.
    script = Script(httpx.RemoteProtocolError, _job())
    assert _mock_client(script).get_job("j").status == "succeeded"
    script = Script(503)
    with pytest.raises(ApiError):
        _mock_client(script, RetryPolicy(attempts=1)).get_job("j")


def test_retry_after_as_an_http_date() -> None:
    from rsae_client import retry_after_seconds

    r = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_after_seconds(r) == 0.0  # in the past
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "7"})) == 7.0


def test_async_client_retries_the_same_way() -> None:
    script = Script(503, _job())

    async def go() -> tuple[str, int]:
        http = httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(script))
        async with AsyncRSAEClient(http=http, retry=FAST) as c:
            job = await c.create_job({"model": "m", "layer": 3, "teacher": {"sae_id": "s"}})
        await http.aclose()
        return job.id, len({r.headers["Idempotency-Key"] for r in script.requests})

    assert asyncio.run(go()) == (_job()["id"], 1) and len(script.requests) == 2


# -- the typed client against the API ----------------------------------------------------------------------------
def test_uploads_in_the_four_formats_are_detected_from_the_folder(
    client: TestClient, make_teacher: Callable[..., Path], tmp_path: Path
) -> None:
    c = RSAEClient(http=client, retry=FAST)
    folders = {"saelens": make_teacher()}
    for fmt, write in (
        ("gemma_scope", write_gemma_scope),
        ("sparsify", write_sparsify),
        ("dictionary_learning", write_dictionary_learning),
    ):
        folders[fmt] = tmp_path / fmt
        folders[fmt].mkdir()
        write(folders[fmt])
    for fmt, folder in folders.items():
        assert teacher_files(folder)[0] == fmt
        sae = c.upload_sae(folder, name=fmt)
        assert sae.source["format"] == fmt and sae.name == fmt
    assert [s.name for s in c.iter_saes(limit=1)] == list(folders)[::-1]  # newest first, one per page
    # Folders the client refuses before sending anything.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no teacher SAE files"):
        c.upload_sae(tmp_path / "empty")
    (folders["dictionary_learning"] / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        c.upload_sae(folders["dictionary_learning"])
    with pytest.raises(ValueError, match="unknown teacher format"):
        c.upload_sae(folders["saelens"], format="npz")


def test_v1_paths_old_paths_redirect_and_operation_ids(client: TestClient, sae_id: str) -> None:
    """Old paths answer 308 to /v1 (query kept; before authentication); a client following redirects still
    creates the job (method and body kept); probes are unversioned; operation ids are readable."""
    r = client.get("/jobs?status=queued&limit=2", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (308, "/v1/jobs?status=queued&limit=2")
    anonymous = TestClient(client.app)
    r = anonymous.post("/saes", files={"cfg": ("cfg.json", b"{}")}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (308, "/v1/saes")
    r = anonymous.get("/jobs/abc/events?after=3", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (308, "/v1/jobs/abc/events?after=3")
    r = client.post("/jobs", json=job_body(sae_id), follow_redirects=True)
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert client.get("/healthz").status_code == 200 and client.get("/v1/healthz").status_code == 404
    ops = {op["operationId"] for path in client.get("/openapi.json").json()["paths"].values() for op in path.values()}
    assert ops == {
        "healthz",
        "readyz",
        "upload_sae",
        "list_saes",
        "get_sae",
        "delete_sae",
        "encode_sae",
        "create_job",
        "estimate_job",
        "list_jobs",
        "get_job",
        "delete_job",
        "cancel_job",
        "list_job_events",
        "list_artifacts",
        "list_checkpoints",
        "download_artifact",
        "encode_job",
        "upload_dataset",
        "list_datasets",
        "get_dataset",
        "delete_dataset",
    }


def test_every_list_has_one_envelope_and_the_iterators_follow_it(client: TestClient, sae_id: str) -> None:
    c = RSAEClient(http=client, retry=FAST)
    ids = [c.create_job(job_body(sae_id)).id for _ in range(3)]
    for job_id in ids[:2]:
        c.cancel_job(job_id)
    for path in ("/v1/jobs", "/v1/saes", f"/v1/jobs/{ids[0]}/events", f"/v1/jobs/{ids[0]}/artifacts"):
        page = client.get(path).json()
        assert set(page) == {"data", "has_more", "next_cursor"} and isinstance(page["data"], list), path
    first = c.list_jobs(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more and first.next_cursor
    assert [j.id for j in c.iter_jobs(limit=1)] == ids[::-1]
    assert [j.id for j in c.iter_jobs(status="cancelled", limit=1)] == ids[:2][::-1]
    events = c.list_job_events(ids[0], limit=100).data
    assert [e.data["status"] for e in events] == ["queued", "cancelled"]
    assert [e.id for e in c.iter_events(ids[0], limit=1)] == [e.id for e in events]
    one = c.list_job_events(ids[0], limit=1)
    assert one.has_more and one.next_cursor == str(events[0].id)
    assert c.list_artifacts(ids[0]) == [] and c.list_checkpoints(ids[0]) == []
    assert c.get_job(ids[2])["status"] == "queued"  # dict-style access still answers


def _backend_client(request: pytest.FixtureRequest, settings: Settings, database_url: str, tmp_path: Path):
    if request.param == "postgres":
        return TestClient(create_app(), headers=bearer(make_token(database_url)))
    url = f"sqlite:///{tmp_path / 'rsae.db'}"
    upgrade(url)
    app = create_app(settings.model_copy(update={"database_url": url}))
    return TestClient(app, headers=bearer(make_token(url)))


@pytest.fixture(params=["postgres", "sqlite"])
def any_client(
    request: pytest.FixtureRequest,
    settings: Settings,
    database_url: str,
    clean_db: None,
    broker: redis.Redis,
    tmp_path: Path,
) -> Iterator[TestClient]:
    """The API on Postgres (the emptied test database) or on a fresh migrated SQLite file, as ``alice``."""
    with _backend_client(request, settings, database_url, tmp_path) as c:
        yield c


def test_job_metadata_is_bounded_echoed_and_filters_lists(
    any_client: TestClient, make_teacher: Callable[..., Path]
) -> None:
    c = RSAEClient(http=any_client, retry=FAST)
    sae = c.upload_sae(make_teacher()).id
    a = c.create_job(job_body(sae), metadata={"team": "interp", "run": "a:1"})
    b = c.create_job(job_body(sae), metadata={"team": "interp", "run": "b"})
    plain = c.create_job(job_body(sae))
    assert a.metadata == {"team": "interp", "run": "a:1"} and plain.metadata == {}
    assert c.get_job(a.id).metadata == a.metadata
    assert [j.id for j in c.iter_jobs(metadata={"team": "interp"})] == [b.id, a.id]
    assert [j.id for j in c.iter_jobs(metadata={"team": "interp", "run": "a:1"}, limit=1)] == [a.id]
    assert [j.id for j in c.iter_jobs(metadata={"team": "other"})] == []
    assert [j.id for j in c.iter_jobs(metadata={"run": "b"}, status="queued")] == [b.id]
    bad = [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"team": "x" * 501}, "metadata.team"),
        ({"k" * 41: "v"}, "metadata"),
        ({"a b": "v"}, "metadata"),
        ({"team": 3}, "metadata.team"),
    ]
    for metadata, field in bad:
        r = any_client.post("/v1/jobs", json={**job_body(sae), "metadata": metadata})
        body = assert_problem(r, 422)
        assert body["field"].startswith(field), (metadata, body)
    assert any_client.post("/v1/jobs", json={**job_body(sae), "metadata": {"k": "v" * 500}}).status_code == 202
    for params, field in (
        ({"metadata[a b]": "x"}, "metadata[a b]"),
        ({"metadata[" + "k" * 41 + "]": "x"}, "metadata[" + "k" * 41 + "]"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata[team]": "x" * 501}, "metadata[team]"),
    ):
        assert_problem(any_client.get("/v1/jobs", params=params), 422, field=field)


def test_checkpoints_list_what_the_worker_saved_with_the_metrics_at_each_step(
    client: TestClient, sae_id: str, db: Session, database_url: str
) -> None:
    job_id = client.post("/v1/jobs", json=job_body(sae_id)).json()["id"]
    db.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=1))
    db.commit()
    reporter = JobReporter(get_sessionmaker(database_url), job_id, clock=lambda: 0.0)
    reporter.attempt = 1
    reporter.on_checkpoint("saved", {"name": "state", "stage": "calibrate", "step": None})
    for step in (10, 20):
        reporter("finetune", 0.5, {"run": "rsae", "step": step, "mse": 100.0 - step})
        reporter("finetune", 0.5, {"run": "control", "step": step, "mse": 200.0 - step})
    reporter.on_checkpoint("saved", {"name": "finetune-rsae", "stage": "finetune", "step": 20})
    reporter.on_checkpoint("saved", {"name": "finetune-control", "stage": "finetune", "step": 15})
    cps = RSAEClient(http=client, retry=FAST).list_checkpoints(job_id)
    assert [(c.name, c.stage, c.step, c.attempt) for c in cps] == [
        ("state", "calibrate", None, 1),
        ("finetune-rsae", "finetune", 20, 1),
        ("finetune-control", "finetune", 15, 1),
    ]
    assert cps[0].metrics is None
    assert cps[1].metrics == {"step": 20, "mse": 80.0}
    assert cps[2].metrics == {"step": 10, "mse": 190.0}  # the last one at or before step 15 of that run
    assert client.get(f"/v1/jobs/{job_id}").json()["checkpoint"]["name"] == "finetune-control"
    assert_problem(client.get("/v1/jobs/00000000-0000-0000-0000-000000000000/checkpoints"), 404)


# -- async twin and CLI over a real socket -----------------------------------------------------------------------
def test_async_client_and_the_cli_against_uvicorn(
    settings: Settings, api_token: str, broker: redis.Redis, make_teacher: Callable[..., Path], tmp_path: Path
) -> None:
    from rsae.cli import main

    gemma = tmp_path / "gemma"
    gemma.mkdir()
    write_gemma_scope(gemma)

    def cli(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = int(e.code or 0)
        return code, out.getvalue(), err.getvalue()

    assert cli("--version")[:2] == (0, "rsae 0.1.0\n")
    with served(settings) as url:
        auth = ["--url", url, "--token", api_token]

        async def flow() -> dict:
            async with AsyncRSAEClient(url, api_token, retry=FAST) as c:
                sae = await c.upload_sae(make_teacher(), name="async")
                job = await c.create_job(job_body(sae.id), metadata={"via": "async"})
                await c.cancel_job(job.id)
                streamed = [e.data.get("status") async for e in c.stream(job.id, timeout=30)]
                final = await c.wait(job.id, timeout=30)
                listed = [j.id async for j in c.iter_jobs(metadata={"via": "async"}, limit=1)]
                saes = [s.id async for s in c.iter_saes(limit=1)]
                return {
                    "job": job.id,
                    "sae": sae.id,
                    "streamed": streamed,
                    "final": final.status,
                    "listed": listed,
                    "saes": saes,
                }

        got = asyncio.run(flow())
        assert got["streamed"] == ["queued", "cancelled"] and got["final"] == "cancelled"
        assert got["listed"] == [got["job"]] and got["saes"] == [got["sae"]]

        code, out, err = cli("jobs", "submit", *auth, "--teacher", str(gemma), "--layer", "3", "--metadata", "via=cli")
        assert code == 0, err
        job = json.loads(out)
        assert job["metadata"] == {"via": "cli"} and job["status"] == "queued"
        code, out, err = cli("jobs", "status", *auth, job["id"], "--json")
        assert code == 0 and json.loads(out)["id"] == job["id"]
        code, out, err = cli("jobs", "status", *auth, job["id"])
        assert code == 0 and out.startswith(f"job {job['id']} queued") and "via=cli" in out
        code, out, err = cli("jobs", "list", *auth, "--json", "--metadata", "via=cli")
        assert code == 0 and [j["id"] for j in json.loads(out)] == [job["id"]]
        code, out, err = cli("jobs", "list", *auth, "--status", "cancelled")
        assert code == 0 and out.split()[0] == got["job"]
        # Hub flags reach the server as a hub reference (an unknown SAELens release is refused there).
        code, out, err = cli(
            "jobs", "submit", *auth, "--hub-release", "no-such-release", "--hub-sae-id", "x", "--layer", "3"
        )
        assert code == 2 and "teacher.hub.release" in err, err
        code, out, err = cli("jobs", "submit", *auth, "--layer", "3")
        assert code == 2 and "exactly one teacher" in err
        code, out, err = cli("jobs", "submit", *auth, "--sae-id", "x", "--layer", "3", "--metadata", "novalue")
        assert code == 2 and "KEY=VALUE" in err


# -- datasets ----------------------------------------------------------------------------------------------------
def _corpora(folder: Path) -> dict[str, Path]:
    """One corpus file per format (txt, jsonl, parquet), 3 documents each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i}: the bank said exports grew while the team won its game on monday" for i in range(3)]
    files = {"txt": folder / "c.txt", "jsonl": folder / "c.jsonl", "parquet": folder / "c.parquet"}
    files["txt"].write_text("\n\n".join(texts))
    files["jsonl"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"body": texts}), files["parquet"])
    return files


def test_dataset_methods_upload_list_get_delete(
    client: TestClient, other_client: TestClient, sae_id: str, tmp_path: Path
) -> None:
    """The sync client's dataset methods against the API on Postgres: the format from the suffix (or given), the
    server's checks as ApiErrors naming the field, pages and the iterator, ownership, and the 409 while a job
    reads the corpus."""
    import hashlib

    c, other = RSAEClient(http=client, retry=FAST), RSAEClient(http=other_client, retry=FAST)
    files = _corpora(tmp_path)
    made = []
    for fmt, path in files.items():
        column = "body" if fmt == "parquet" else None
        d = c.upload_dataset(path, name=f"c-{fmt}", text_column=column)
        assert (d.format, d.documents, d.name, d.size_bytes) == (fmt, 3, f"c-{fmt}", path.stat().st_size)
        assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and d.use_as == f"upload:{d.id}"
        assert d.text_column == {"txt": None, "jsonl": "text", "parquet": "body"}[fmt]
        made.append(d)
    renamed = tmp_path / "corpus.data"  # no known suffix: the format is given
    renamed.write_bytes(files["jsonl"].read_bytes())
    made.append(c.upload_dataset(renamed, format="jsonl"))
    assert made[-1].format == "jsonl" and made[-1].name is None

    with pytest.raises(ValueError, match="pass format="):
        c.upload_dataset(renamed)
    with pytest.raises(FileNotFoundError):
        c.upload_dataset(tmp_path / "missing.txt")
    with pytest.raises(ApiError) as bad:
        c.upload_dataset(files["jsonl"], text_column="content")
    assert (bad.value.status, bad.value.field) == (422, "text_column")

    newest_first = [d.id for d in made[::-1]]
    page = c.list_datasets(limit=3)
    assert [d.id for d in page.data] == newest_first[:3] and page.has_more and page.next_cursor
    assert [d.id for d in c.list_datasets(limit=3, after=page.next_cursor).data] == newest_first[3:]
    assert [d.id for d in c.iter_datasets(limit=1)] == newest_first
    assert c.get_dataset(made[0].id) == made[0]
    assert list(other.iter_datasets()) == []
    with pytest.raises(ApiError) as theirs:
        other.get_dataset(made[0].id)
    assert (theirs.value.status, theirs.value.code) == (404, "dataset_not_found")

    job = c.create_job(job_body(sae_id, data={"dataset": made[1].use_as}))  # queued: it reads the corpus
    with pytest.raises(ApiError) as in_use:
        c.delete_dataset(made[1].id)
    assert (in_use.value.status, in_use.value.code) == (409, "dataset_in_use")
    assert in_use.value.problem["job_ids"] == [job.id]
    assert c.delete_dataset(made[0].id) is None
    with pytest.raises(ApiError) as gone:
        c.get_dataset(made[0].id)
    assert gone.value.status == 404
    assert [d.id for d in c.iter_datasets()] == newest_first[:3]


def test_async_dataset_methods_against_uvicorn(
    settings: Settings, api_token: str, broker: redis.Redis, tmp_path: Path
) -> None:
    """The async twin's dataset methods over a real socket."""
    files = _corpora(tmp_path)

    async def flow(url: str) -> dict:
        async with AsyncRSAEClient(url, api_token, retry=FAST) as c:
            up = [await c.upload_dataset(p, name=fmt) for fmt, p in files.items() if fmt != "parquet"]
            listed = [d.id async for d in c.iter_datasets(limit=1)]
            page = await c.list_datasets(limit=1)
            got = await c.get_dataset(up[0].id)
            await c.delete_dataset(up[0].id)
            try:
                await c.get_dataset(up[0].id)
                status = 200
            except ApiError as e:
                status = e.status
            after = [d.id async for d in c.iter_datasets()]
            return {"up": up, "listed": listed, "page": page, "got": got, "status": status, "after": after}

    with served(settings) as url:
        r = asyncio.run(flow(url))
    ids = [d.id for d in r["up"]]
    assert [d.format for d in r["up"]] == ["txt", "jsonl"] and r["got"] == r["up"][0]
    assert r["listed"] == ids[::-1] and r["page"].has_more and [d.id for d in r["page"].data] == ids[1:]
    assert r["status"] == 404 and r["after"] == ids[1:]
