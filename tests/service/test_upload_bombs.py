"""POST /saes against decompression bombs, lying headers, deep JSON and degenerate teachers (real API, Postgres,
Redis): each answers 4xx problem+json naming the upload field, and the API process's peak RSS (VmHWM, reset
through /proc/self/clear_refs; the TestClient serves in this process) grows by a few MB at most: declared
sizes are checked from headers before any member is read, and the teacher is read in a memory-bounded child.

Run with ``-s`` to see the measured RSS growth per case."""

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
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.config import Settings
from support.servers import assert_problem, post_sae

D_IN = 576
BIG = 1 << 15  # d_sae of the bombs: W_enc and W_dec of 576 x 32768 float32, 151 MB expanded, ~150 KB deflated
MAX_GROWTH = 32e6
"""Largest accepted peak RSS growth of the API process during one request (bytes)."""


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(request: Callable[[], object]) -> tuple[object, int]:
    """Run ``request`` and return (its result, the peak RSS growth of this process in bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    out = request()
    return out, (_status_kb("VmHWM") - before) * 1024


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_bomb(arrays: dict[str, tuple[int, ...]], chunk: int = 1 << 22) -> bytes:
    """A deflated ``.npz`` whose members are float32 zeros of these shapes (streamed: nothing big is allocated)."""
    buf, zero = io.BytesIO(), bytes(chunk)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, shape in arrays.items():
            n = int(np.prod(shape)) * 4
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                f.write(_npy_header(shape))
                while n > 0:
                    f.write(zero[: min(n, chunk)])
                    n -= chunk
    return buf.getvalue()


def pt_bomb(shapes: dict[str, tuple[int, ...]], chunk: int = 1 << 22) -> bytes:
    """``torch.save`` of float32 zero tensors of these shapes, its zip re-written with deflate."""
    raw = io.BytesIO()
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            with zin.open(info) as src, zout.open(info.filename, "w", force_zip64=True) as dst:
                while b := src.read(chunk):
                    dst.write(b)
    return out.getvalue()


def safetensors_bomb() -> bytes:
    """A safetensors file whose header declares 2.4 GB of tensors but which carries 8 bytes of data."""
    header = {
        "W_enc": {"dtype": "F32", "shape": [D_IN, 1 << 20], "data_offsets": [0, D_IN * (1 << 20) * 4]},
    }
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + bytes(8)


GEMMA = {"W_enc": (D_IN, BIG), "W_dec": (BIG, D_IN), "b_enc": (BIG,), "b_dec": (D_IN,), "threshold": (BIG,)}
DL = {"encoder.weight": (BIG, D_IN), "encoder.bias": (BIG,), "decoder.weight": (D_IN, BIG), "bias": (D_IN,)}
DL_CONFIG = json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_IN, "dict_size": BIG}}).encode()
SAELENS_CFG = json.dumps({"architecture": "standard", "d_in": D_IN, "d_sae": 1 << 20}).encode()
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def bombs() -> dict[str, dict[str, tuple[str, bytes]]]:
    """The multipart files of each bomb, built once."""
    return {
        "npz": {"params": ("params.npz", npz_bomb(GEMMA))},
        "deflated ae.pt": {"ae": ("ae.pt", pt_bomb(DL)), "config": ("config.json", DL_CONFIG)},
        "safetensors header": {"cfg": ("cfg.json", SAELENS_CFG), "weights": ("w", safetensors_bomb())},
    }


def _post(client: TestClient, files: dict, case: str) -> tuple[dict, int]:
    size = sum(len(v[1]) for v in files.values())
    r, growth = measure(lambda: client.post("/v1/saes", files=files))
    print(
        f"\n{case}: {size / 1e3:.0f} KB uploaded -> {r.status_code} {r.json().get('code')}, RSS +{growth / 1e6:.1f} MB"
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/saes").json()["data"] == []
    return r.json() | {"status": r.status_code}, growth


@pytest.mark.parametrize("case,field", [("npz", "params"), ("deflated ae.pt", "ae"), ("safetensors header", "weights")])
def test_declared_size_is_refused_before_any_member_is_read(
    case: str, field: str, bombs: dict, client: TestClient, settings: Settings
) -> None:
    client.app.state.settings = settings.model_copy(update={"max_teacher_expanded_bytes": 32 << 20})
    body, growth = _post(client, bombs[case], f"{case}, expanded limit 32 MiB")
    assert (body["status"], body["code"], body["field"]) == (413, "teacher_too_large", field)
    assert growth < MAX_GROWTH


@pytest.mark.parametrize(
    "case,code,field", [("npz", "invalid_thresholds", "params.threshold"), ("deflated ae.pt", "dead_teacher", "ae")]
)
def test_bomb_under_the_limits_is_read_in_the_bounded_child(
    case: str, code: str, field: str, bombs: dict, client: TestClient
) -> None:
    """Default limits: 151 MB of zeros is within them, so the child reads it; the zeros are then refused as a
    teacher (thresholds 0, no live latent), and the API process never held the arrays."""
    body, growth = _post(client, bombs[case], f"{case}, default limits")
    assert (body["status"], body["code"], body["field"]) == (422, code, field)
    assert growth < MAX_GROWTH


def test_memory_bound_stops_the_import(bombs: dict, client: TestClient, settings: Settings) -> None:
    client.app.state.settings = settings.model_copy(update={"teacher_import_memory_bytes": 64 << 20})
    body, growth = _post(client, bombs["npz"], "npz, import memory bound 64 MiB")
    assert (body["status"], body["code"], body["field"]) == (413, "teacher_import_memory", "params")
    assert growth < MAX_GROWTH


@pytest.mark.parametrize("field", ["cfg", "config"])
def test_deep_json_part_is_422_like_a_deep_body(field: str, client: TestClient) -> None:
    files = {"cfg": ("cfg.json", DEEP), "weights": ("w", safetensors_bomb())}
    if field == "config":
        files = {"ae": ("ae.pt", b"x"), "config": ("config.json", DEEP)}
    body, growth = _post(client, files, f"{field}.json nested 100,000 deep")
    assert (body["status"], body["code"], body["field"]) == (422, "validation_error", field)
    assert body["errors"][0]["code"] == "json_too_deep"  # as a request body nested too deeply
    assert growth < MAX_GROWTH


def test_json_part_is_parsed_as_strictly_as_a_body(client: TestClient, make_teacher: Callable[..., Path]) -> None:
    """Duplicate keys and over-long integers in cfg.json: the same 422 as in a JSON request body, naming the key."""
    folder = make_teacher()
    weights = (folder / "sae_weights.safetensors").read_bytes()
    cfg = (folder / "cfg.json").read_text().strip()
    duplicate = (cfg[:-1] + ', "d_in": 577}').encode()
    body = assert_problem(post_sae(client, duplicate, weights), 422, field="cfg.d_in")
    assert body["errors"][0]["code"] == "duplicate_key"
    huge = (cfg[:-1] + ', "k": ' + "9" * 5000 + "}").encode()
    body = assert_problem(post_sae(client, huge, weights), 422, field="cfg.k")
    assert body["errors"][0]["code"] == "int_too_long"
    assert client.get("/v1/saes").json()["data"] == []


def _tensors_with(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None], **cfg: Any) -> tuple[bytes, bytes]:
    tensors = {k: v.clone() for k, v in st_load((folder / "sae_weights.safetensors").read_bytes()).items()}
    edit(tensors)
    return json.dumps({**json.loads((folder / "cfg.json").read_text()), **cfg}).encode(), st_save(tensors)


DEGENERATE: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], dict[str, Any], str, str]] = {
    "no live latent": (lambda t: t["b_enc"].fill_(-1e7), {}, "dead_teacher", "weights"),
    "forward overflows float32": (lambda t: t["W_dec"].fill_(1e38), {}, "non_finite_teacher", "weights"),
    "jumprelu with negative thresholds": (
        lambda t: t.update(threshold=torch.full((64,), -0.1)),
        {"architecture": "jumprelu"},
        "invalid_thresholds",
        "weights.threshold",
    ),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_teacher_is_422_naming_the_cause(
    case: str, client: TestClient, make_teacher: Callable[..., Path]
) -> None:
    edit, cfg, code, field = DEGENERATE[case]
    body = assert_problem(post_sae(client, *_tensors_with(make_teacher(), edit, **cfg)), 422, field=field, code=code)
    assert "Hint" in body["detail"]
    assert client.get("/v1/saes").json()["data"] == []


def test_import_past_its_time_limit_is_422_naming_the_field(
    client: TestClient, settings: Settings, make_teacher: Callable[..., Path]
) -> None:
    client.app.state.settings = settings.model_copy(update={"teacher_import_seconds": 0.001})
    folder = make_teacher()
    r = post_sae(client, (folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes())
    assert_problem(r, 422, field="weights", code="teacher_import_timeout")
    client.app.state.settings = settings
    r = post_sae(client, (folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes())
    assert r.status_code == 201, r.text  # the next import is served normally
