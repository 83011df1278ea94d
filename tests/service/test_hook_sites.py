"""POST /jobs and hook sites: the site comes from the request or the teacher's cfg; a request that contradicts
the teacher's cfg is a 422 naming the field unless ``settings.data.allow_hook_override``; widths are checked
at the site (``attn.hook_z`` is n_heads * d_head wide). Real Postgres and Redis (no job runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from rsae.saes import ReLUSAE
from service.client import upload_sae
from service.models import Job
from support.servers import assert_problem

TEACHER_HOOK = "blocks.5.hook_mlp_out"


def _teacher(client: TestClient, tmp_path: Path, hook: str | None, d_in: int = 576) -> str:
    """Upload a small ReLU teacher whose cfg names ``hook`` (metadata.hook_name, as SAELens 6 writes it)."""
    sae = ReLUSAE(d_in=d_in, d_sae=32, metadata={"hook_name": hook} if hook else {})
    sae.init_weights(torch.Generator().manual_seed(0))
    return upload_sae(client, sae.save(tmp_path / f"t-{abs(hash((hook, d_in)))}"))["id"]


def _job(sae_id: str, **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "smollm2-135m", "teacher": {"sae_id": sae_id}}
    settings = top.pop("settings", {})
    return {**body, **{k: v for k, v in top.items() if v is not None}, "settings": settings}


@pytest.mark.parametrize(
    ("top", "field"),
    [
        ({"layer": 3}, "layer"),  # another layer than the teacher's
        ({"hook": "blocks.5.hook_resid_post"}, "hook"),  # another site of its layer
        ({"hook": "model.layers.5.self_attn"}, "hook"),  # attention output, in HF naming
        ({"layer": 5, "hook": "attn.hook_z"}, "hook"),
    ],
)
def test_request_contradicting_the_teachers_hook_is_422_naming_the_field(
    client: TestClient, tmp_path: Path, db: Session, broker: redis.Redis, top: dict[str, Any], field: str
) -> None:
    sae_id = _teacher(client, tmp_path, TEACHER_HOOK)
    body = assert_problem(client.post("/jobs", json=_job(sae_id, **top)), 422, field=field, code="invalid_hook")
    assert TEACHER_HOOK in body["detail"] and "allow_hook_override" in body["detail"]
    assert db.scalar(select(Job.id)) is None and broker.llen("gpu") == 0
    # the explicit override flag lets the same request through
    r = client.post("/jobs", json=_job(sae_id, **top, settings={"data": {"allow_hook_override": True}}))
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    "top",
    [{}, {"layer": 5}, {"hook": "hook_mlp_out"}, {"hook": TEACHER_HOOK}, {"hook": "model.layers.5.mlp", "layer": 5}],
)
def test_site_agreeing_with_the_teacher_or_taken_from_it_is_accepted(
    client: TestClient, tmp_path: Path, top: dict[str, Any]
) -> None:
    """No layer, its layer, a bare site, the same name, the same module in HF naming (Llama: mlp = mlp_out)."""
    sae_id = _teacher(client, tmp_path, TEACHER_HOOK)
    r = client.post("/jobs", json=_job(sae_id, **top))
    assert r.status_code == 202, r.text
    assert r.json()["request"].get("hook") == top.get("hook")


def test_site_checks_without_a_teacher_hook(client: TestClient, tmp_path: Path) -> None:
    """A teacher whose cfg names no hook needs a layer or a hook; bad names and layers name their field; the
    teacher's width must match the activations at the site."""
    sae_id = _teacher(client, tmp_path, None)
    assert_problem(client.post("/jobs", json=_job(sae_id)), 422, field="layer", code="invalid_hook")
    assert_problem(client.post("/jobs", json=_job(sae_id, hook="blocks.3.hook_nope")), 422, field="hook")
    assert_problem(client.post("/jobs", json=_job(sae_id, hook="hook_mlp_out")), 422, field="hook")  # no layer
    r = client.post("/jobs", json=_job(sae_id, layer=2, hook="blocks.3.hook_mlp_out"))
    assert_problem(r, 422, field="layer", code="invalid_hook")
    r = client.post("/jobs", json=_job(sae_id, hook="blocks.30.hook_mlp_out"))
    assert_problem(r, 422, field="hook", code="invalid_layer")
    r = client.post("/jobs", json=_job(sae_id, hook="transformer.h.3.mlp"))  # a GPT-2 path on a Llama model
    assert_problem(r, 422, field="hook", code="invalid_hook")
    for hook in ("blocks.3.hook_resid_pre", "blocks.3.attn.hook_z", "model.layers.3.mlp.down_proj"):
        assert client.post("/jobs", json=_job(sae_id, hook=hook)).status_code == 202, hook
    narrow = _teacher(client, tmp_path, "blocks.3.attn.hook_z", d_in=64)
    assert_problem(client.post("/jobs", json=_job(narrow)), 422, field="teacher.sae_id", code="invalid_teacher")
