"""Issue 15, "Encode for tools": ``POST /v1/jobs/{id}/encode`` and ``POST /v1/saes/{id}/encode`` against the running
stack (uvicorn, the GPU worker, the long-lived encode worker, Redis db 14, the test Postgres; nothing mocked).

A tiny real job (random ReLU teacher uploaded, bundled SmolLM2-135M, BBC text, 32-token contexts) runs through
the GPU worker; the API's top latents must equal those of the downloaded artifacts loaded with ``rsae`` and encoded
in this process (and of the uploaded teacher folder), for text and for raw activations. Then bad inputs (4xx
naming the field), owner isolation (404), a deleted teacher (409), the per-user rate (429 with Retry-After) and
a stopped encode worker (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from rsae_client import AsyncRSAEClient, RetryPolicy, RSAEClient
from service.client import download_artifacts, upload_sae, wait_for_job
from service.config import Settings
from service.embedded import Stack
from support.servers import assert_problem, bearer, job_body, make_token

pytestmark = pytest.mark.e2e

TINY = {
    "data": {"train_tokens": 1024, "eval_tokens": 256, "ctx_len": 32},
    "calibrate": {"steps": 5, "tokens": 256},
    "finetune": {"steps": 10, "batch_size": 128, "eval_every": 10, "control": False},
    "eval": {"ce_sequences": 0, "probe_ks": [], "probe_train_sequences": 0},
}
TEXTS = [
    "Shares in the carmaker fell sharply on Monday after it warned that profits would be lower than expected this "
    "year, blaming rising steel prices and weak demand in Europe.",
    "The striker scored twice.",
]
MAX_TOKENS, MAX_ROWS, RATE = 256, 8, 30


@pytest.fixture
def e2e_settings(e2e_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The stack's settings with small encode bounds, a short start timeout and a low per-user rate."""
    monkeypatch.setenv("RSAE_ENCODE_MAX_TOKENS", str(MAX_TOKENS))
    monkeypatch.setenv("RSAE_ENCODE_MAX_ROWS", str(MAX_ROWS))
    monkeypatch.setenv("RSAE_ENCODE_START_TIMEOUT_SECONDS", "4")
    monkeypatch.setenv("RSAE_RATE_LIMIT_ENCODE_PER_USER", f"{RATE}/minute")
    return e2e_settings


def _assert_same(api: list[dict[str, Any]], local: list[dict[str, Any]]) -> None:
    """Token for token: the same ids, positions and kept flags, the same top latent indices, values to 1e-4."""
    assert len(api) == len(local)
    for a, b in zip(api, local, strict=True):
        assert {k: a[k] for k in ("context", "position", "token_id", "token", "kept")} == {
            k: b[k] for k in ("context", "position", "token_id", "token", "kept")
        }
        assert (a["latents"] is None) == (b["latents"] is None)
        for name, top in (b["latents"] or {}).items():
            assert a["latents"][name]["indices"] == top["indices"], (a, b)
            assert a["latents"][name]["values"] == pytest.approx(top["values"], rel=1e-4, abs=1e-5)


def test_encode_returns_the_latents_of_the_artifacts_loaded_locally(
    stack: Stack, http: httpx.Client, make_teacher: Callable[..., Path], tmp_path: Path, database_url: str
) -> None:
    import rsae
    from rsae.encode import encode_rows, encode_texts, site_of_artifacts, site_of_teacher
    from rsae.models import load_model
    from rsae.saes import load_sae

    teacher_dir = make_teacher(d_sae=128)
    sae = upload_sae(http, teacher_dir, name="tiny teacher")
    job = http.post("/v1/jobs", json=job_body(sae["id"], **TINY)).json()
    early = http.post(f"/v1/jobs/{job['id']}/encode", json={"text": "too early"})
    assert_problem(early, 409, code="job_not_finished", field="id")
    done = wait_for_job(http, job["id"], timeout=600, interval=0.5)
    assert done["status"] == "succeeded", done["error"]

    # -- text, both SAEs: the API's answer equals rsae loading + encoding the downloaded artifacts locally
    with RSAEClient(stack.base_url, http.headers["Authorization"].split()[1]) as client:
        got = client.encode(job["id"], TEXTS, top_k=5)
    folder = tmp_path / "download"
    download_artifacts(http, done, folder)
    site = site_of_artifacts(folder)
    assert (got.model, got.hook_name, got.saes) == ("smollm2-135m", "blocks.3.hook_resid_post", ["rsae", "teacher"])
    assert got.conventions == site.conventions.to_dict() and got.conventions["context_size"] == 32
    model, tok = load_model(site.model)
    saes = {"rsae": rsae.load(folder), "teacher": load_sae(teacher_dir)}
    local = encode_texts(model, tok, saes, TEXTS, site, 5)
    api = got.model_dump(mode="json")["texts"]
    for a, b in zip(api, local, strict=True):
        _assert_same(a, b)
    assert max(t["context"] for t in api[0]) >= 1  # the long text spans several 32-token contexts
    kept = [t for t in api[0] if t["kept"]]
    assert kept and all(t["latents"]["rsae"]["indices"] for t in kept)  # the RSAE fires on real text

    # -- raw activations, the upgraded SAE alone (async client)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1)) * 3

    async def rows() -> Any:
        async with AsyncRSAEClient(stack.base_url, http.headers["Authorization"].split()[1]) as c:
            return await c.encode(job["id"], activations=x.tolist(), top_k=4, which="rsae")

    by_rows = asyncio.run(rows())
    assert by_rows.saes == ["rsae"] and by_rows.texts is None and by_rows.conventions is None
    want = encode_rows({"rsae": saes["rsae"]}, x, 4)["rsae"]
    for r, w in zip(by_rows.rows, want, strict=True):
        assert r.latents["rsae"].indices == w["indices"]
        assert r.latents["rsae"].values == pytest.approx(w["values"], rel=1e-4, abs=1e-5)

    # -- the uploaded teacher alone, with its own conventions (none recorded: 128 tokens, no BOS, position 0 dropped)
    alone = http.post(
        f"/v1/saes/{sae['id']}/encode",
        json={"text": TEXTS[0], "model": "smollm2-135m", "hook": "blocks.3.hook_resid_post", "top_k": 3},
    )
    assert alone.status_code == 200, alone.text
    tsite = site_of_teacher(saes["teacher"], model="smollm2-135m", hook="blocks.3.hook_resid_post")
    _assert_same(
        alone.json()["texts"][0], encode_texts(model, tok, {"teacher": saes["teacher"]}, TEXTS[:1], tsite, 3)[0]
    )
    assert alone.json()["conventions"]["seqpos_slice"] == [1, None]
    assert_problem(http.post(f"/v1/saes/{sae['id']}/encode", json={"text": "x"}), 422, field="model")

    # -- the long-lived worker loaded the host model once and each SAE once for all these requests
    log = next(c for c in stack.children if c.name == "encode-worker").tail(2000)
    assert log.count("encode cache: loaded host model") == 1 and log.count("encode cache: loaded SAE") == 2, log

    _bad_inputs(http, job["id"], sae["id"])

    # -- owner isolation: another user's job and SAE answer 404, as unknown ids do
    with httpx.Client(base_url=stack.base_url, headers=bearer(make_token(database_url, "mallory"))) as mallory:
        assert_problem(mallory.post(f"/v1/jobs/{job['id']}/encode", json={"text": "hi"}), 404)
        assert_problem(mallory.post(f"/v1/saes/{sae['id']}/encode", json={"text": "hi"}), 404)

    # -- the teacher upload deleted: 'both' is a 409 naming 'which', 'rsae' still answers
    assert http.delete(f"/v1/saes/{sae['id']}").status_code == 204
    assert_problem(
        http.post(f"/v1/jobs/{job['id']}/encode", json={"text": "hi"}), 409, code="teacher_unavailable", field="which"
    )
    assert http.post(f"/v1/jobs/{job['id']}/encode", json={"text": "hi", "which": "rsae"}).status_code == 200

    _rate_limit_and_no_worker(stack, database_url, job["id"])


def _bad_inputs(http: httpx.Client, job_id: str, sae_id: str) -> None:
    url = f"/v1/jobs/{job_id}/encode"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"text": "a", "activations": [[0.0] * 576]}, 422, "text"),
        ({"top_k": 3}, 422, "text"),
        ({"text": "a", "top_k": 0}, 422, "top_k"),
        ({"text": "a", "top_k": 65}, 422, "top_k"),
        ({"text": "a", "which": "control"}, 422, "which"),
        ({"text": "a", "surprise": 1}, 422, "surprise"),
        ({"text": ["a"] * 33}, 413, "text"),
        ({"text": "word " * 400}, 413, "text"),  # counted by the worker's tokenizer
        ({"activations": [[0.0] * 576] * (MAX_ROWS + 1)}, 413, "activations"),
        ({"activations": [[0.0] * 576, [0.0] * 575]}, 422, "activations"),
        ({"activations": [[0.0] * 10]}, 422, "activations"),  # d_in checked by the worker
    ]
    for body, status, field in cases:
        assert_problem(http.post(url, json=body), status, field=field)
    assert_problem(http.post("/v1/jobs/00000000-0000-4000-8000-000000000000/encode", json={"text": "a"}), 404)
    assert_problem(http.post(f"/v1/saes/{sae_id}/encode", json={"text": "a", "which": "both"}), 422, field="which")


def _rate_limit_and_no_worker(stack: Stack, database_url: str, job_id: str) -> None:
    """A fresh user gets RATE requests a minute, then 429 with Retry-After; with the encode worker stopped, a
    request is a 503 with Retry-After after the start timeout."""
    headers = bearer(make_token(database_url, "bob"))
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as bob:
        codes = [bob.post(f"/v1/jobs/{job_id}/encode", json={"text": "hi"}).status_code for _ in range(RATE)]
        assert set(codes) == {404}, codes  # bob's requests are counted although they name another user's job
        limited = assert_problem(bob.post(f"/v1/jobs/{job_id}/encode", json={"text": "hi"}), 429, code="rate_limited")
        assert limited["retry_after"] >= 1
    worker = next(c for c in stack.children if c.name == "encode-worker")
    worker.stop()
    stack.children.remove(worker)
    token = make_token(database_url, "alice")
    with RSAEClient(stack.base_url, token, retry=RetryPolicy(attempts=1)) as client:
        r = client.http.post(f"/v1/jobs/{job_id}/encode", json={"text": "hi", "which": "rsae"})
    body = assert_problem(r, 503, code="encode_unavailable")
    assert int(r.headers["Retry-After"]) >= 1 and body["detail"]
