"""POST /saes in each supported teacher format (real API, Postgres, Redis; files written by the real
libraries where one writes them): the upload is detected, converted, stored, reported back in ``source``,
and the stored teacher computes exactly what :func:`rsae.formats.load_teacher` reads from the original files
(whose equivalence with each library's own forward is ``tests/core/test_formats.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from rsae.formats import load_teacher
from rsae.saes import load_sae
from service.config import Settings
from service.teachers import UPLOAD_FILES
from support.hub import hub_cache
from support.servers import assert_problem, job_body
from support.teachers import D_IN, D_SAE
from support.teachers import write_dictionary_learning as _dictionary_learning
from support.teachers import write_gemma_scope as _gemma_scope
from support.teachers import write_sparsify as _sparsify


def _files(folder: Path) -> dict[str, tuple[str, bytes]]:
    """The multipart files of POST /saes for the format files in ``folder`` (form field per file name)."""
    field = {name: form for form, name in UPLOAD_FILES.items()}
    return {field[p.name]: (p.name, p.read_bytes()) for p in folder.iterdir() if p.name in field}


@pytest.mark.parametrize(
    "fmt,make,family",
    [
        ("gemma_scope", _gemma_scope, "jumprelu"),
        ("sparsify", _sparsify, "topk"),
        ("dictionary_learning", _dictionary_learning, "relu"),
    ],
)
def test_upload_each_format(
    fmt: str, make, family: str, client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    src = tmp_path / fmt
    src.mkdir()
    make(src)
    r = client.post("/v1/saes", files=_files(src), data={"name": fmt})
    assert r.status_code == 201, r.text
    sae = r.json()
    assert (sae["family"], sae["d_in"], sae["d_sae"]) == (family, D_IN, D_SAE)
    assert sae["source"]["format"] == fmt and sae["source"]["conventions"], sae["source"]
    assert "path" not in sae["source"]  # no server path leaks
    stored = load_sae(settings.uploads_dir / sae["id"])
    reference = load_teacher(src).sae
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        torch.testing.assert_close(stored.encode(x), reference.encode(x))
        torch.testing.assert_close(stored(x), reference(x))
    assert client.post("/v1/jobs", json=job_body(sae["id"])).status_code == 202


def test_upload_format_errors(client: TestClient, tmp_path: Path) -> None:
    # A pickle carrying an object, not tensors: torch.load(weights_only=True) refuses it.
    class Evil:
        def __reduce__(self):  # noqa: D105 - the classic pickle payload
            return (print, ("pwned",))

    torch.save({"encoder.weight": Evil()}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(
        json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_IN, "dict_size": D_SAE}})
    )
    assert_problem(client.post("/v1/saes", files=_files(tmp_path)), 422, field="ae", code="invalid_teacher")
    # Garbage ae.pt bytes that send torch's weights-only unpickler off its stack (IndexError; found by the
    # Schemathesis run as a 500): a 4xx naming the field, like every other unreadable file.
    for garbage in (b"R.", b"\x80\x02t.", b"a", b"\x80\x02}q\x00(X"):
        (tmp_path / "ae.pt").write_bytes(garbage)
        assert_problem(client.post("/v1/saes", files=_files(tmp_path)), 422, field="ae", code="invalid_teacher")
    # Two weights files at once, and none at all.
    both = {"weights": ("a", b"x"), "params": ("b", b"y")}
    assert_problem(client.post("/v1/saes", files=both), 422, field="params")
    assert_problem(
        client.post("/v1/saes", files={"cfg": ("cfg.json", b"{}")}), 422, field="weights", code="missing_field"
    )
    # An npz whose arrays are pickled objects is refused (allow_pickle=False).
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"x": 1}], dtype=object))
    assert_problem(
        client.post("/v1/saes", files={"params": ("params.npz", (tmp_path / "params.npz").read_bytes())}),
        422,
        code="invalid_teacher",
    )
    assert client.get("/v1/saes").json()["data"] == []


def test_hub_teacher_reference(
    client: TestClient, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``teacher.hub`` is validated at submission without network, and the worker's resolution reads a
    prepared offline hub cache (``HF_HUB_OFFLINE=1``) and imports the teacher in any format."""
    from rsae.errors import TeacherError
    from service.db import get_sessionmaker
    from service.jobs import resolve_teacher
    from service.schemas import TeacherRef

    ref = {"repo_id": "some-org/smollm2-saes", "subfolder": "layer_3"}
    assert client.post("/v1/jobs", json={"layer": 3, "teacher": {"hub": ref}}).status_code == 202
    for bad, field in (
        (({"repo_id": "https://evil.example/x"}), "teacher.hub.repo_id"),
        ({"repo_id": "a/b", "subfolder": "../../etc"}, "teacher.hub.subfolder"),
        ({"release": "no-such-release", "sae_id": "x"}, "teacher.hub.release"),
        ({"repo_id": "a/b", "revision": "../x"}, "teacher.hub.revision"),
    ):
        assert_problem(client.post("/v1/jobs", json={"layer": 3, "teacher": {"hub": bad}}), 422, field=field)
    assert_problem(
        client.post("/v1/jobs", json={"layer": 3, "teacher": {"hub": ref, "sae_id": "x"}}), 422, field="teacher"
    )

    src = tmp_path / "src"
    src.mkdir()
    _gemma_scope(src)
    cache = tmp_path / "hub"
    hub_cache(cache, ref["repo_id"], {"layer_3/params.npz": src / "params.npz"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with get_sessionmaker(settings.database_url)() as s:
        folder = resolve_teacher(s, settings, TeacherRef(hub=ref), dest=tmp_path / "work" / "teacher")
        stored, reference = load_sae(folder), load_teacher(src).sae
        x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(1)) * 3
        with torch.no_grad():
            torch.testing.assert_close(stored(x), reference(x))
        with pytest.raises(TeacherError) as e:  # not cached, and the hub is offline
            resolve_teacher(s, settings, TeacherRef(hub={"repo_id": "other-org/missing"}), dest=tmp_path / "t2")
        assert e.value.field == "teacher.hub" and "offline" in e.value.message
