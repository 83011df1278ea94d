"""A corpus of hostile and broken inputs against the real API (Postgres + Redis): each one answers 4xx
problem+json naming the field, nothing is stored, nothing is queued, and the server keeps serving.

Teacher uploads cover corrupt, truncated and pickled files, wrong shapes and dtypes, NaN/Inf, missing and
contradictory cfg keys, unknown families and absurd numbers; job requests cover wrong types, out-of-range
values, URLs instead of model ids, local paths, unknown fields and malformed bodies. The worker-side half
(inputs only the worker can discover, e.g. a hub model that is not available offline) is in
``tests/test_e2e.py``. The list of cases is ``docs/reliability.md``'s "Bad input" table.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.client import upload_sae
from service.config import Settings
from service.models import Job
from support.servers import assert_problem, job_body, post_sae

Files = tuple[bytes, bytes]


# -- teacher uploads -------------------------------------------------------------------------------
def _cfg(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "cfg.json").read_text())


def _weights(folder: Path) -> bytes:
    return (folder / "sae_weights.safetensors").read_bytes()


def _cfg_with(**changes: Any) -> Callable[[Path], Files]:
    """cfg.json with keys changed (a value of ``...`` deletes the key); weights untouched."""

    def make(folder: Path) -> Files:
        cfg = {**_cfg(folder), **changes}
        return json.dumps({k: v for k, v in cfg.items() if v is not ...}).encode(), _weights(folder)

    return make


def _tensors_with(edit: Callable[[dict[str, torch.Tensor]], None], **cfg_changes: Any) -> Callable[[Path], Files]:
    """Weights re-saved after ``edit`` mutates the tensor dict; cfg optionally changed."""

    def make(folder: Path) -> Files:
        tensors = {k: v.clone() for k, v in st_load(_weights(folder)).items()}
        edit(tensors)
        cfg = {**_cfg(folder), **cfg_changes}
        return json.dumps(cfg).encode(), st_save(tensors)

    return make


def _raw_weights(make_bytes: Callable[[bytes], bytes]) -> Callable[[Path], Files]:
    return lambda folder: ((folder / "cfg.json").read_bytes(), make_bytes(_weights(folder)))


def _pickle(folder: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(st_load(_weights(folder)), buf)
    return buf.getvalue()


def _npz(folder: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in st_load(_weights(folder)).items()})
    return buf.getvalue()


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = value(t[name])

    return edit


def _poke(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name].view(-1)[0] = value

    return edit


BAD_UPLOADS: dict[str, tuple[Callable[[Path], Files], str]] = {
    # cfg.json problems
    "cfg not JSON": (lambda f: (b"{not json", _weights(f)), "cfg"),
    "cfg not an object": (lambda f: (b"[1, 2]", _weights(f)), "cfg"),
    "cfg not UTF-8": (lambda f: (b'{"d_in": "\xff\xfe"}', _weights(f)), "cfg"),
    "cfg empty": (lambda f: (b"", _weights(f)), "cfg"),
    "d_in missing": (_cfg_with(d_in=...), "cfg.d_in"),
    "d_in a string": (_cfg_with(d_in="576"), "cfg.d_in"),
    "d_in fractional": (_cfg_with(d_in=576.5), "cfg.d_in"),
    "d_sae negative": (_cfg_with(d_sae=-64), "cfg.d_sae"),
    "d_sae astronomically large": (_cfg_with(d_sae=10**30), "cfg.d_sae"),
    "d_sae contradicts the weights": (_cfg_with(d_sae=65), "weights.W_enc"),
    "unknown architecture": (_cfg_with(architecture="gated-mystery"), "cfg.architecture"),
    "architecture not a string": (_cfg_with(architecture=["standard"]), "cfg.architecture"),
    "topk without k": (_cfg_with(architecture="topk"), "cfg.k"),
    "topk k larger than d_sae": (_cfg_with(architecture="topk", k=10_000), "cfg.k"),
    "jumprelu without threshold": (_cfg_with(architecture="jumprelu"), "weights.threshold"),
    "jumprelu threshold of the wrong length": (
        _tensors_with(lambda t: t.update(threshold=torch.ones(63)), architecture="jumprelu"),
        "weights.threshold",
    ),
    "per-token normalisation": (_cfg_with(normalize_activations="layer_norm"), "cfg.normalize_activations"),
    "per-token norm rescale": (_cfg_with(normalize_activations="constant_norm_rescale"), "cfg.normalize_activations"),
    "unfolded normalisation, factor unknown": (
        _cfg_with(normalize_activations="expected_average_only_in"),
        "cfg.normalize_activations",
    ),
    "normalisation factor not positive": (
        _cfg_with(normalize_activations="expected_average_only_in", norm_scaling_factor=0),
        "cfg.normalize_activations",
    ),
    "one attention head": (_cfg_with(hook_head_index=3), "cfg.hook_head_index"),
    "apply_b_dec_to_input not a bool": (_cfg_with(apply_b_dec_to_input="yes"), "cfg.apply_b_dec_to_input"),
    # weights file problems
    "weights empty": (_raw_weights(lambda w: b""), "weights"),
    "weights random bytes": (_raw_weights(lambda w: bytes(range(256)) * 64), "weights"),
    "weights truncated": (_raw_weights(lambda w: w[:5000]), "weights"),
    "safetensors header length absurd": (_raw_weights(lambda w: struct.pack("<Q", 2**60) + w[8:]), "weights"),
    "safetensors header not JSON": (_raw_weights(lambda w: struct.pack("<Q", 8) + b"not json" + w[8:]), "weights"),
    "pickle instead of safetensors": (lambda f: ((f / "cfg.json").read_bytes(), _pickle(f)), "weights"),
    "npz sent as the safetensors field": (lambda f: ((f / "cfg.json").read_bytes(), _npz(f)), "weights"),
    "zip archive": (_raw_weights(lambda w: _zip(w)), "weights"),
    "W_dec missing": (_tensors_with(lambda t: t.pop("W_dec")), "weights.W_dec"),
    "W_enc transposed": (_tensors_with(_set("W_enc", lambda x: x.T.contiguous())), "weights.W_enc"),
    "b_enc has two dims": (_tensors_with(_set("b_enc", lambda x: x[None])), "weights.b_enc"),
    "W_enc integer dtype": (_tensors_with(_set("W_enc", lambda x: x.to(torch.int32))), "weights.W_enc"),
    "NaN in W_dec": (_tensors_with(_poke("W_dec", float("nan"))), "weights.W_dec"),
    "+Inf in b_enc": (_tensors_with(_poke("b_enc", float("inf"))), "weights.b_enc"),
    "-Inf in W_enc": (_tensors_with(_poke("W_enc", float("-inf"))), "weights.W_enc"),
    "value overflows float32": (_tensors_with(_set("b_dec", lambda x: x.double().fill_(1e300))), "weights.b_dec"),
}


def _zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("sae_weights.safetensors", payload)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_422_naming_the_field(
    case: str, client: TestClient, settings: Settings, make_teacher: Callable[..., Path]
) -> None:
    make_files, field = BAD_UPLOADS[case]
    cfg, weights = make_files(make_teacher())
    body = assert_problem(post_sae(client, cfg, weights), 422, field=field)
    assert body["code"] == "invalid_teacher" and len(body["detail"]) > 10
    assert list(settings.uploads_dir.iterdir()) == []  # the temp folder was removed
    assert client.get("/v1/saes").json()["data"] == []
    assert client.get("/healthz").status_code == 200


# -- job requests ----------------------------------------------------------------------------------
def _raw(content: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": content, "headers": {"content-type": content_type}}


INVALID_JOBS: dict[str, tuple[Callable[[str], dict[str, Any]], str, str]] = {
    # (request kwargs from the sae id, field, code)
    "negative layer": (lambda s: {"json": {**job_body(s), "layer": -1}}, "layer", "validation_error"),
    "layer beyond the model": (lambda s: {"json": {**job_body(s), "layer": 30}}, "layer", "invalid_layer"),
    "layer astronomically large": (lambda s: {"json": {**job_body(s), "layer": 10**30}}, "layer", "validation_error"),
    "layer a word": (lambda s: {"json": {**job_body(s), "layer": "three"}}, "layer", "validation_error"),
    "layer fractional": (lambda s: {"json": {**job_body(s), "layer": 3.5}}, "layer", "validation_error"),
    "layer missing, and the teacher's cfg names no hook": (
        lambda s: {"json": {k: v for k, v in job_body(s).items() if k != "layer"}},
        "layer",
        "invalid_hook",
    ),
    "hook not a site": (lambda s: {"json": {**job_body(s), "hook": "blocks.3.hook_q"}}, "hook", "validation_error"),
    "hook contradicting layer": (
        lambda s: {"json": {**job_body(s), "hook": "blocks.4.hook_mlp_out"}},
        "layer",
        "invalid_hook",
    ),
    "unknown sae_id": (lambda s: {"json": job_body("no-such-sae")}, "teacher.sae_id", "invalid_teacher"),
    "sae_id far too long": (lambda s: {"json": job_body("x" * 10_000)}, "teacher.sae_id", "validation_error"),
    "no teacher": (lambda s: {"json": {**job_body(s), "teacher": {}}}, "teacher", "validation_error"),
    "two teachers": (
        lambda s: {"json": {**job_body(s), "teacher": {"sae_id": s, "path": "/tmp"}}},
        "teacher",
        "validation_error",
    ),
    "URL as model": (lambda s: {"json": {**job_body(s), "model": "https://evil.example/m"}}, "model", "invalid_model"),
    "malformed hub id (a relative path)": (
        lambda s: {"json": {**job_body(s), "model": "org/name/../../x"}},
        "model",
        "local_paths_disabled",
    ),
    "empty model": (lambda s: {"json": {**job_body(s), "model": "  "}}, "model", "validation_error"),
    "steps a word": (
        lambda s: {"json": job_body(s, finetune={"steps": "abc"})},
        "settings.finetune.steps",
        "validation_error",
    ),
    "steps astronomically large": (
        lambda s: {"json": job_body(s, finetune={"steps": 10**15})},
        "settings.finetune.steps",
        "validation_error",
    ),
    "negative learning rate": (
        lambda s: {"json": job_body(s, finetune={"lr": -1.0})},
        "settings.finetune.lr",
        "validation_error",
    ),
    "NaN learning rate": (
        lambda s: _raw(
            json.dumps(job_body(s)).replace('"settings": {}', '"settings": {"finetune": {"lr": NaN}}').encode()
        ),
        "settings.finetune.lr",
        "validation_error",
    ),
    "zero training tokens": (
        lambda s: {"json": job_body(s, data={"train_tokens": 0})},
        "settings.data.train_tokens",
        "validation_error",
    ),
    "settings a list": (lambda s: {"json": {**job_body(s), "settings": [1, 2]}}, "settings", "validation_error"),
    "unknown top-level field": (lambda s: {"json": {**job_body(s), "gpu": True}}, "gpu", "validation_error"),
    "unknown settings field": (
        lambda s: {"json": job_body(s, remez={"p": 3, "degree": 9})},
        "settings.remez.degree",
        "validation_error",
    ),
    "device is not a setting": (lambda s: {"json": job_body(s, device="cuda")}, "settings.device", "validation_error"),
    "local teacher path refused": (
        lambda s: {"json": {**job_body(s), "teacher": {"path": "/etc"}}},
        "teacher.path",
        "local_paths_disabled",
    ),
    "local dataset refused": (
        lambda s: {"json": job_body(s, data={"dataset": "/etc/passwd"})},
        "settings.data.dataset",
        "local_paths_disabled",
    ),
    "local model refused": (lambda s: {"json": {**job_body(s), "model": "/root"}}, "model", "local_paths_disabled"),
    "relative dataset (a file in the worker's directory)": (
        lambda s: {"json": job_body(s, data={"dataset": "README.md"})},
        "settings.data.dataset",
        "local_paths_disabled",
    ),
    "relative dataset escaping with ..": (
        lambda s: {"json": job_body(s, data={"dataset": "rsae/../../../etc/passwd"})},
        "settings.data.dataset",
        "local_paths_disabled",
    ),
    "relative model folder": (lambda s: {"json": {**job_body(s), "model": "rsae"}}, "model", "local_paths_disabled"),
    "hub model not allowed (405B)": (
        lambda s: {"json": {**job_body(s), "model": "meta-llama/Llama-3.1-405B"}},
        "model",
        "model_not_allowed",
    ),
    "train_tokens over the server's budget": (
        lambda s: {"json": job_body(s, data={"train_tokens": 200_000_000})},
        "settings.data.train_tokens",
        "token_budget_exceeded",
    ),
    "eval_tokens over the server's budget": (
        lambda s: {"json": job_body(s, data={"eval_tokens": 50_000_000})},
        "settings.data.eval_tokens",
        "token_budget_exceeded",
    ),
    "activation scratch over the disk budget": (
        lambda s: {
            "json": job_body(
                s, data={"train_tokens": 4_194_304, "eval_tokens": 1_048_576, "activation_storage": "disk"}
            )
        },
        "settings.data.train_tokens",
        "disk_budget_exceeded",
    ),
    "body a JSON array": (lambda s: {"json": [job_body(s)]}, "body", "validation_error"),
    "body empty": (lambda s: _raw(b""), "body", "validation_error"),
    "body not JSON": (lambda s: _raw(b"{oops"), "body", "validation_error"),
    "body deeply nested": (
        lambda s: _raw(b'{"settings": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "body",
        "validation_error",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_JOBS))
def test_invalid_job_is_4xx_naming_the_field(
    case: str, client: TestClient, sae_id: str, db: Session, broker: redis.Redis
) -> None:
    make_request, field, code = INVALID_JOBS[case]
    r = client.post("/v1/jobs", **make_request(sae_id))
    body = assert_problem(r, 422, code=code)
    fields = [body["field"]] + [e["field"] for e in body.get("errors", [])]
    assert field in fields or any(f.startswith(field) for f in fields), body
    assert db.scalar(select(Job.id)) is None
    assert broker.llen("gpu") == 0
    assert client.get("/healthz").status_code == 200


def test_teacher_width_must_match_the_model(client: TestClient, make_teacher: Callable[..., Path], db: Session) -> None:
    narrow = upload_sae(client, make_teacher("narrow", d_in=64))["id"]
    assert_problem(client.post("/v1/jobs", json=job_body(narrow)), 422, field="teacher.sae_id", code="invalid_teacher")
    assert db.scalar(select(Job.id)) is None


def test_corpus_has_at_least_30_cases() -> None:
    assert len(BAD_UPLOADS) + len(INVALID_JOBS) >= 60
