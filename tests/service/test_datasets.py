"""Uploaded corpora (``POST /datasets`` and friends) and the data sources of jobs, against the real Postgres and
Redis; the jobs run in this process (``worker.tasks.run_job``) on SmolLM2 with tiny settings:

- upload limits and checks: 413 past ``RSAE_MAX_DATASET_UPLOAD_BYTES`` and for a Parquet compression bomb, 422
  naming the field for a bad file, the storage quota counting corpora;
- ownership: another user's corpus is a 404 on every route and a 422 ``settings.data.dataset`` in a job;
- a job from an uploaded corpus, one from a Hugging Face data set served from a prepared offline cache, and one
  with a BOS-prepending teacher of context_size 256 (the conventions recorded in the report, with sources).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from rsae.saes import ReLUSAE
from service.app import create_app
from service.client import upload_sae
from service.config import Settings, get_settings
from support.hfdata import hf_offline, prepare_hf_cache
from support.servers import assert_problem, bearer, job_body

WORDS = (
    "the market rose after the bank said new figures showed growth in exports while the team won its game and "
    "voters backed the plan for schools as film stars met fans at the festival in london on monday"
).split()
TINY = {
    "data": {"train_tokens": 1024, "eval_tokens": 256, "ctx_len": 64},
    "calibrate": {"steps": 5, "tokens": 512},
    "finetune": {"steps": 4, "batch_size": 128, "eval_every": 2, "control": False},
    "eval": {"ce_sequences": 2, "probe_ks": []},
}


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) for _ in range(n)]


def _post(client: TestClient, field: str, content: bytes, **data: str) -> Any:
    return client.post(
        "/v1/datasets", files={field: (f"corpus.{field}", content, "application/octet-stream")}, data=data
    )


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(cols: dict[str, list[Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


@pytest.fixture
def env_client(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, api_token: str, broker: Any
) -> Iterator[Callable[..., TestClient]]:
    """``env_client(RSAE_X="...")``: the API as ``alice`` built after setting these variables."""
    opened: list[TestClient] = []

    def make(**env: str) -> TestClient:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        c = TestClient(create_app(), headers=bearer(api_token))
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)
    get_settings.cache_clear()


def test_upload_list_get_delete_each_format(client: TestClient, other_client: TestClient) -> None:
    """txt, jsonl and parquet: 201 with sha256, size, document count and the use_as reference; listed, shown and
    deletable by the owner only (404 for another user, like an unknown id)."""
    texts = _texts(5)
    bodies = {
        "txt": "\n\n".join(texts).encode(),
        "jsonl": _jsonl([{"text": t, "id": i} for i, t in enumerate(texts)]),
        "parquet": _parquet({"body": texts}),
    }
    ids = []
    for field, content in bodies.items():
        extra = {"text_column": "body"} if field == "parquet" else {}
        r = _post(client, field, content, name=f"c-{field}", **extra)
        assert r.status_code == 201, r.text
        d = r.json()
        assert d["format"] == field and d["documents"] == 5 and d["size_bytes"] == len(content)
        assert d["sha256"] == hashlib.sha256(content).hexdigest() and d["use_as"] == f"upload:{d['id']}"
        assert d["text_column"] == {"txt": None, "jsonl": "text", "parquet": "body"}[field]
        assert r.headers["location"] == f"/v1/datasets/{d['id']}"
        ids.append(d["id"])
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == ids[::-1]
    assert client.get(f"/v1/datasets/{ids[0]}").json()["name"] == "c-txt"
    assert other_client.get("/v1/datasets").json()["data"] == []
    assert_problem(other_client.get(f"/v1/datasets/{ids[0]}"), 404, code="dataset_not_found")
    assert_problem(other_client.delete(f"/v1/datasets/{ids[0]}"), 404)
    assert client.delete(f"/v1/datasets/{ids[0]}").status_code == 204
    assert_problem(client.delete(f"/v1/datasets/{ids[0]}"), 404)
    assert_problem(client.get("/v1/datasets/not-an-id"), 404)


@pytest.mark.parametrize(
    ("field", "content", "data", "bad"),
    [
        ("txt", b"caf\xe9 latin-1\n", {}, "txt"),
        ("txt", b"\n\n  \n", {}, "txt"),
        ("jsonl", b'{"text": "fine"}\n{"text": \n', {}, "jsonl"),
        ("jsonl", _jsonl([{"body": "no text column"}]), {}, "jsonl"),
        ("jsonl", _jsonl([{"text": 5}]), {}, "jsonl"),
        ("jsonl", _jsonl([{"text": "x"}]), {"text_column": "content"}, "text_column"),
        ("jsonl", _jsonl([{"input_ids": [1, -2]}]), {}, "jsonl"),
        ("parquet", b"PAR1 this is not parquet", {}, "parquet"),
        ("txt", b"hello", {"text_column": "text"}, "text_column"),
    ],
)
def test_bad_corpus_is_422_naming_the_field(
    client: TestClient, field: str, content: bytes, data: dict, bad: str
) -> None:
    body = assert_problem(_post(client, field, content, **data), 422, field=bad)
    assert body["code"] in ("invalid_dataset", "validation_error")
    assert client.get("/v1/datasets").json()["data"] == []


def test_form_errors(client: TestClient) -> None:
    assert_problem(client.post("/v1/datasets", data={"name": "x"}, files={}), 415)
    assert_problem(client.post("/v1/datasets", files={"name": (None, b"x")}), 422, field="txt", code="missing_field")
    two = {"txt": ("a.txt", b"a"), "jsonl": ("a.jsonl", _jsonl([{"text": "a"}]))}
    assert_problem(client.post("/v1/datasets", files=two), 422, code="validation_error")
    assert_problem(_post(client, "csv", b"a,b"), 422, field="csv", code="unknown_field")


def test_size_limits_and_quota(env_client: Callable[..., TestClient], other_client: TestClient) -> None:
    """413 past the upload limit and for a Parquet file declaring > 8x the limit decompressed; the storage quota
    counts corpora (413 storage_quota_exceeded, with the usage) and a deletion frees it."""
    c = env_client(RSAE_MAX_DATASET_UPLOAD_BYTES="20000", RSAE_MAX_STORAGE_BYTES_PER_USER="30000")
    assert_problem(_post(c, "txt", b"word " * 5000), 413)
    bomb = _parquet({"text": ["a" * 400_000]})  # a few KB on disk, 400 KB declared > 8 x 20 KB
    assert len(bomb) < 20_000
    assert_problem(_post(c, "parquet", bomb), 413, field="parquet", code="dataset_too_large")
    first = _post(c, "txt", b"word " * 3000)  # 15 KB
    assert first.status_code == 201, first.text
    body = assert_problem(_post(c, "txt", b"more " * 3200), 413, code="storage_quota_exceeded")
    assert body["usage"]["datasets"] == 15_000 and body["requested_bytes"] == 16_000
    assert c.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
    assert _post(c, "txt", b"more " * 3200).status_code == 201


def test_another_users_corpus_cannot_be_used(client: TestClient, other_client: TestClient, sae_id: str) -> None:
    """A job naming another user's corpus (or an unknown one) is a 422 naming settings.data.dataset; its owner's
    job is accepted, and the corpus cannot be deleted while that job is unfinished (409)."""
    ds = _post(client, "txt", "\n\n".join(_texts(20)).encode()).json()
    mallory_sae = upload_sae(other_client, _teacher_folder(Path(get_settings().data_dir) / "m"))["id"]
    r = other_client.post("/jobs", json=job_body(mallory_sae, data={"dataset": ds["use_as"]}))
    assert_problem(r, 422, field="settings.data.dataset", code="invalid_dataset")
    assert_problem(client.post("/jobs", json=job_body(sae_id, data={"dataset": "upload:nope"})), 422)
    r = client.post("/jobs", json=job_body(sae_id, data={"dataset": ds["use_as"]}))
    assert r.status_code == 202, r.text
    body = assert_problem(client.delete(f"/v1/datasets/{ds['id']}"), 409, code="dataset_in_use")
    assert body["job_ids"] == [r.json()["id"]]


def _teacher_folder(folder: Path, metadata: dict[str, Any] | None = None) -> Path:
    sae = ReLUSAE(576, 64, metadata=metadata)
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae.save(folder)


def _run(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    """Submit ``body``, run the job here (the real worker code, not Celery), return its report.json."""
    import worker.tasks

    r = client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    status = worker.tasks.run_job(job_id, get_settings())
    job = client.get(f"/jobs/{job_id}").json()
    assert status == "succeeded", job.get("error")
    return client.get(f"/jobs/{job_id}/artifacts/report.json").json()


@pytest.mark.slow
def test_job_from_uploaded_corpus(client: TestClient, sae_id: str) -> None:
    """An uploaded .jsonl corpus read by a job: the report names it by id and sha256, never by its server path;
    the conventions are the legacy ones (this teacher records none)."""
    ds = _post(client, "jsonl", _jsonl([{"text": t} for t in _texts(120)]), name="news").json()
    report = _run(
        client,
        {
            **job_body(sae_id, **TINY),
            "layer": 1,
            "settings": {**TINY, "data": {**TINY["data"], "dataset": ds["use_as"]}},
        },
    )  # noqa: E501
    assert report["data"]["train"]["dataset"] == f"{ds['use_as']} (news) sha256:{ds['sha256']}"
    assert report["config"]["data"]["dataset"].startswith("upload:")
    conv = report["data"]["conventions"]
    assert conv["seqpos_slice"] == [1, None] and conv["prepend_bos"] is False and conv["context_size"] == 64
    assert conv["sources"]["context_size"] == "request" and conv["sources"]["prepend_bos"] == "default"
    assert report["data"]["train"]["rows"] == 1024 and "datasets" not in json.dumps(report)


@pytest.mark.slow
def test_job_from_hub_dataset_offline_cache(
    client: TestClient, sae_id: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Hugging Face data set id, config/split/revision and text column given, read offline from a prepared
    ``datasets`` cache (HF_HUB_OFFLINE=1: no network)."""
    texts = _texts(150, seed=1)
    prepare_hf_cache(
        tmp_path / "hf", "acme/tiny-news", {"train": {"content": texts}, "validation": {"content": texts[:3]}}
    )
    hf_offline(monkeypatch, tmp_path / "hf")
    data = {**TINY["data"], "dataset": "acme/tiny-news", "hf_split": "train", "hf_revision": "main"}
    data |= {"text_column": "content", "hf_config": "default"}
    report = _run(client, {**job_body(sae_id), "layer": 1, "settings": {**TINY, "data": data}})
    assert report["data"]["train"]["dataset"] == "acme/tiny-news"
    assert report["data"]["source"] == {
        "hf_config": "default",
        "hf_split": "train",
        "hf_revision": "main",
        "text_column": "content",
    }  # noqa: E501


@pytest.mark.slow
def test_job_with_bos_teacher_of_context_256(client: TestClient, tmp_path: Path) -> None:
    """A teacher recording SAELens conventions (context_size 256, prepend_bos, all positions): the job uses
    them, and the report records each with its source."""
    meta = {"context_size": 256, "prepend_bos": True, "seqpos_slice": [None], "exclude_special_tokens": False}
    sid = upload_sae(client, _teacher_folder(tmp_path / "bos", {**meta, "hook_name": "blocks.1.hook_resid_post"}))["id"]
    data = {"train_tokens": 1024, "eval_tokens": 512}
    report = _run(client, {**job_body(sid), "layer": 1, "settings": {**TINY, "data": data}})
    conv = report["data"]["conventions"]
    assert conv["context_size"] == 256 and conv["prepend_bos"] is True and conv["seqpos_slice"] == [None]
    assert conv["sequence_separator_token"] == "bos" and conv["disable_concat_sequences"] is False
    assert conv["sources"] == {
        "context_size": "teacher",
        "prepend_bos": "teacher",
        "seqpos_slice": "teacher",
        "exclude_special_tokens": "teacher",
        "sequence_separator_token": "default",
        "disable_concat_sequences": "default",
    }
    assert report["data"]["train"]["ctx_len"] == 256 and report["eval_split"]["ctx_len"] == 256


def test_conventions_checked_at_submission(client: TestClient, sae_id: str, tmp_path: Path) -> None:
    """Malformed conventions, in the request or in an uploaded teacher's metadata, are a 422 naming the setting
    at submission (not a failed job later)."""
    r = client.post("/jobs", json=job_body(sae_id, data={"seqpos_slice": [1, 2, 0]}))
    assert_problem(r, 422, field="settings.data.seqpos_slice", code="invalid_dataset")
    odd = upload_sae(client, _teacher_folder(tmp_path / "odd", {"context_size": 10**6, "prepend_bos": True}))["id"]
    assert_problem(client.post("/jobs", json=job_body(odd)), 422, field="settings.data.ctx_len")
    assert client.post("/jobs", json=job_body(odd, data={"ctx_len": 256})).status_code == 202  # the override


def test_datasets_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: Any) -> None:
    """The embedded default: migration 0009 on SQLite (up, down to 0007, up again), then upload, list, ownership
    and the quota as on Postgres."""
    from alembic import command
    from sqlalchemy import text

    from service.db import get_sessionmaker
    from service.migrate import alembic_config, upgrade
    from service.storage import storage_usage
    from support.servers import API_REDIS_DB, REDIS_URL, make_token

    monkeypatch.delenv("RSAE_DATABASE_URL", raising=False)
    monkeypatch.setenv("RSAE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RSAE_BROKER_URL", f"{REDIS_URL}/{API_REDIS_DB}")
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.database_url)
    cfg = alembic_config(settings.database_url)
    command.downgrade(cfg, "0007")
    command.upgrade(cfg, "head")
    url = settings.database_url
    try:
        with (
            TestClient(create_app(), headers=bearer(make_token(url))) as c,
            TestClient(c.app, headers=bearer(make_token(url, "mallory"))) as other,
        ):
            content = _parquet({"input_ids": [[1, *range(10, 80)]] * 4})
            d = _post(c, "parquet", content).json()
            assert d["text_column"] == "input_ids" and d["documents"] == 4
            assert [x["id"] for x in c.get("/v1/datasets").json()["data"]] == [d["id"]]
            assert_problem(other.get(f"/v1/datasets/{d['id']}"), 404)
            with get_sessionmaker(url)() as s:
                alice = s.scalar(text("SELECT owner_id FROM datasets"))
                assert storage_usage(s, settings, alice).datasets == len(content)
            assert c.delete(f"/v1/datasets/{d['id']}").status_code == 204
            assert not (settings.datasets_dir / d["id"]).exists()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("spec", ["", "https://example.com/corpus.txt", "upload:", "relative/../x.txt"])
def test_bad_dataset_specs_name_the_field(client: TestClient, sae_id: str, spec: str) -> None:
    """An empty dataset, a URL, an upload reference without id or a relative path: 422 naming the setting."""
    assert_problem(
        client.post("/jobs", json=job_body(sae_id, data={"dataset": spec})), 422, field="settings.data.dataset"
    )
