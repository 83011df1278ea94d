"""Job bounds and server-side paths (issue 11) against the real API (Postgres + Redis), a local stand-in for the
hub (:class:`support.hub.FakeHub`, via ``HF_ENDPOINT``) and the worker's ``run_job`` in process.

- paths: only absolute, under ``RSAE_LOCAL_PATH_ROOTS`` once resolved (``..``, symlinks and a root's siblings
  cannot escape), never resolved against a working directory; off without roots;
- bounds: model allow-list, hub download size from the hub's metadata (also in the worker when the hub did not
  answer at submission), token and disk budgets;
- downloads stop between files on cancel or deadline;
- ``rsae-service up`` serves local paths only on loopback, with roots, to one user (SQLite, its default).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.client import upload_sae
from service.config import ConfigError, Settings, get_settings
from support.hub import FakeHub
from support.servers import assert_problem, bearer, job_body, make_token

GB = 10**9
CONFIG = json.dumps({"num_hidden_layers": 12, "hidden_size": 576}).encode()
HUGE = 191 * 4 * GB + len(CONFIG)
"""Bytes of the fake 405B model: 191 shards of 4 GB and its config."""


def fresh_app(monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    """A TestClient for an app created after setting ``RSAE_<KEY>`` variables."""
    for k, v in env.items():
        monkeypatch.setenv(f"RSAE_{k.upper()}", v)
    get_settings.cache_clear()
    return TestClient(create_app(), headers=bearer(make_token(get_settings().database_url)))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A fake hub at ``HF_ENDPOINT`` (online mode) with an empty hub cache in ``tmp_path/hf``."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with FakeHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        h.add("org/small", {"config.json": CONFIG, "tokenizer.json": b"{}", "model.safetensors": b"w" * 1000})
        h.add("org/huge-405b", {"config.json": CONFIG, **{f"model-{i:05d}.safetensors": 4 * GB for i in range(191)}})
        h.add(  # 1 GB in safetensors; the .bin, ONNX and GGUF copies are not what from_pretrained fetches
            "org/dual",
            {"config.json": CONFIG, "model.safetensors": GB, "pytorch_model.bin": 5 * GB, "onnx/m.onnx": 5 * GB},
        )
        h.add(
            "org/saes", {"small/cfg.json": b"{}", "small/sae_weights.safetensors": 10**6, "big/w.safetensors": 9 * GB}
        )
        yield h


# -- server-side paths -----------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A root with a text file, a corpus folder and escape hatches (symlinks out), and folders beside it."""
    root, other, sibling = tmp_path / "root", tmp_path / "other", tmp_path / "root-sibling"
    for d in (root / "corpus", other, sibling):
        d.mkdir(parents=True)
    for d in (root, other, sibling):
        (d / "data.txt").write_text("A document.\n\nAnother document.\n")
    (root / "corpus" / "a.txt").write_text("text")
    (root / "escape.txt").symlink_to(other / "data.txt")
    (root / "escape-dir").symlink_to(other, target_is_directory=True)
    return {"root": root, "other": other, "sibling": sibling}


def test_paths_only_under_the_roots(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
    tree: dict[str, Path],
) -> None:
    root, other, sibling = tree["root"], tree["other"], tree["sibling"]
    teacher = make_teacher("root/teacher")
    with fresh_app(monkeypatch, allow_local_paths="true", local_path_roots=json.dumps([str(root)])) as c:
        sae_id = upload_sae(c, make_teacher())["id"]

        def dataset(spec: str) -> dict:
            return job_body(sae_id, data={"dataset": spec})

        refused = {
            "relative file (the worker's README.md)": (dataset("README.md"), "settings.data.dataset"),
            "relative .. escape": (dataset("rsae/../../../etc/passwd"), "settings.data.dataset"),
            "absolute .. escape": (dataset(f"{root}/../other/data.txt"), "settings.data.dataset"),
            "symlinked file out of the root": (dataset(str(root / "escape.txt")), "settings.data.dataset"),
            "file under a symlinked folder": (dataset(str(root / "escape-dir" / "data.txt")), "settings.data.dataset"),
            "the root's sibling (same prefix)": (dataset(str(sibling / "data.txt")), "settings.data.dataset"),
            "home-relative": (dataset("~/data.txt"), "settings.data.dataset"),
            "relative model folder": ({**job_body(sae_id), "model": "rsae"}, "model"),
            "model folder beside the root": ({**job_body(sae_id), "model": str(other)}, "model"),
            "teacher folder beside the root": ({"layer": 3, "teacher": {"path": str(other)}}, "teacher.path"),
            "relative teacher folder": ({"layer": 3, "teacher": {"path": "root/teacher"}}, "teacher.path"),
        }
        for case, (body, field) in refused.items():
            problem = assert_problem(c.post("/v1/jobs", json=body), 422, field=field, code="path_not_allowed")
            assert field in problem["detail"], case
        missing = assert_problem(
            c.post("/v1/jobs", json=dataset(str(root / "missing.txt"))), 422, field="settings.data.dataset"
        )
        assert missing["code"] == "invalid_dataset"
        assert c.get("/v1/jobs").json()["data"] == []
        for body in (
            dataset(str(root / "data.txt")),
            dataset(str(root / "corpus")),
            {"layer": 3, "teacher": {"path": str(teacher)}},
        ):
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
        assert len(c.get("/v1/jobs").json()["data"]) == 3


def test_paths_refused_without_roots_and_roots_must_be_absolute(
    settings: Settings, clean_db: None, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch, tree: dict[str, Path]
) -> None:
    with fresh_app(monkeypatch, allow_local_paths="true") as c:
        sae_id = upload_sae(c, _teacher_dir(tree["root"]))["id"]
        body = job_body(sae_id, data={"dataset": str(tree["root"] / "data.txt")})
        problem = assert_problem(c.post("/v1/jobs", json=body), 422, field="settings.data.dataset")
        assert problem["code"] == "local_paths_disabled" and "RSAE_LOCAL_PATH_ROOTS" in problem["detail"]
    with pytest.raises(ValidationError, match="not an absolute path"):
        Settings(local_path_roots=["relative/root"])


def _teacher_dir(where: Path) -> Path:
    import torch

    from rsae.saes import ReLUSAE

    sae = ReLUSAE(d_in=576, d_sae=64)
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae.save(where / "uploaded-teacher")


# -- bounds ----------------------------------------------------------------------------------------
def test_model_allow_list_and_hub_sizes_at_submission(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
    hub: FakeHub,
) -> None:
    with fresh_app(monkeypatch, allowed_models=json.dumps(["smollm2-135m", "org/*"])) as c:
        sae_id = upload_sae(c, make_teacher())["id"]

        def model(spec: str) -> dict:
            return {**job_body(sae_id), "model": spec}

        p = assert_problem(c.post("/v1/jobs", json=model("meta-llama/Llama-3.1-405B")), 422, field="model")
        assert p["code"] == "model_not_allowed" and "RSAE_ALLOWED_MODELS" in p["detail"]
        asked = hub.metadata_requests
        p = assert_problem(c.post("/v1/jobs", json=model("org/huge-405b")), 422, field="model")
        assert p["code"] == "download_too_large" and f"{HUGE / 1024**3:.2f} GiB" in p["detail"], p["detail"]
        assert "192 files" in p["detail"] and "RSAE_MAX_HUB_DOWNLOAD_BYTES" in p["detail"]
        assert hub.metadata_requests == asked + 1 and hub.downloads == []  # metadata only, nothing fetched
        p = assert_problem(c.post("/v1/jobs", json=model("org/missing")), 422, field="model")
        assert p["code"] == "invalid_model"
        whole = {"layer": 3, "teacher": {"hub": {"repo_id": "org/saes"}}}
        p = assert_problem(c.post("/v1/jobs", json=whole), 422, field="teacher.hub", code="download_too_large")
        assert "the whole repository org/saes" in p["detail"]
        for body in (
            model("org/small"),
            model("org/dual"),
            {**whole, "teacher": {"hub": {**whole["teacher"]["hub"], "subfolder": "small"}}},
        ):
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
        assert hub.downloads == []


def test_disk_budget_counts_the_rows_a_job_writes(client: TestClient, sae_id: str) -> None:
    """Training rows on disk: all of them in disk mode; only the head when they are streamed (explicitly, or by
    ``auto`` because they would take more than 4 GiB), which is what lets a large job through the disk budget."""
    data = {"train_tokens": 4_194_304, "eval_tokens": 1_048_576}  # 12 GB of float32 rows at d_model 576
    p = assert_problem(
        client.post("/v1/jobs", json=job_body(sae_id, data={**data, "activation_storage": "disk"})),
        422,
        field="settings.data.train_tokens",
        code="disk_budget_exceeded",
    )
    assert "activation_storage: stream" in p["detail"]
    for storage in ("stream", "auto"):
        r = client.post("/v1/jobs", json=job_body(sae_id, data={**data, "activation_storage": storage}))
        assert r.status_code == 202, r.text
        assert r.json()["request"]["settings"]["data"]["activation_storage"] == storage


def test_hub_unreachable_at_submission_then_the_worker_checks(
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
    hub: FakeHub,
) -> None:
    """Accepted while the hub does not answer (the size cannot be known); the worker asks before downloading
    and fails the job with the same code, field and figure."""
    from worker.tasks import run_job

    url = hub.url
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    with fresh_app(monkeypatch, allowed_models=json.dumps(["org/*"])) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        r = c.post("/v1/jobs", json={**job_body(sae_id), "model": "org/huge-405b"})
        assert r.status_code == 202, r.text
        monkeypatch.setenv("HF_ENDPOINT", url)
        assert run_job(r.json()["id"], get_settings()) == "failed"
        job = c.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["error"]["code"] == "download_too_large" and job["error"]["field"] == "model"
    assert f"{HUGE / 1024**3:.2f} GiB" in job["error"]["detail"] and hub.downloads == []


@pytest.mark.parametrize("stop", ["cancel", "deadline", "cancel-teacher"])
def test_download_stops_between_files(
    stop: str,
    settings: Settings,
    clean_db: None,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    make_teacher: Callable[..., Path],
    hub: FakeHub,
) -> None:
    """A model (or a teacher folder) of 8 files at 0.5 s each: a cancel (or the deadline) during the download
    ends the job within a file plus one status poll (2 s), not after the whole repository."""
    from worker.tasks import run_job

    shards = {f"model-{i}.safetensors": f"w{i}".encode() * 100 for i in range(7)}  # distinct blobs
    hub.add("org/slow", {"config.json": CONFIG, **shards})
    hub.add("org/slow-saes", {f"layer_3/{name}": data for name, data in {"cfg.json": CONFIG, **shards}.items()})
    hub.delay = 0.5
    env = {"allowed_models": json.dumps(["org/*", "smollm2-135m"])}
    if stop == "deadline":
        env["job_deadline_seconds"] = "1.2"
    with fresh_app(monkeypatch, **env) as c:
        sae_id = upload_sae(c, make_teacher())["id"]
        if stop == "cancel-teacher":
            body = {"layer": 3, "teacher": {"hub": {"repo_id": "org/slow-saes", "subfolder": "layer_3"}}}
        else:
            body = {**job_body(sae_id), "model": "org/slow"}
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        result: list[str | None] = []
        worker = threading.Thread(target=lambda: result.append(run_job(job_id, get_settings())))
        worker.start()
        deadline = time.monotonic() + 30
        while not hub.downloads and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        if stop != "deadline":
            assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
        worker.join(30)
        took = time.monotonic() - t0
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert not worker.is_alive()
    assert len(hub.downloads) < 8, hub.downloads
    if stop != "deadline":
        assert result == ["cancelled"] and job["status"] == "cancelled" and took < 3.5, took
    else:
        assert result == ["failed"] and job["error"]["code"] == "deadline_exceeded"


# -- rsae-service up -------------------------------------------------------------------------------
def test_up_serves_local_paths_only_on_loopback_with_roots_to_one_user(tmp_path: Path) -> None:
    """On the embedded default database (SQLite): refused on 0.0.0.0, without roots, or with two users holding
    tokens; the children get RSAE_ALLOW_LOCAL_PATHS=false unless asked, whatever the parent's environment."""
    from service.auth import issue_token
    from service.cli import build_parser
    from service.db import get_sessionmaker
    from service.embedded import Stack, check_local_paths_exposure
    from service.migrate import upgrade

    s = Settings(data_dir=tmp_path, local_path_roots=[tmp_path], broker_url="redis://127.0.0.1:9/0")
    assert s.is_sqlite
    upgrade(s.database_url)
    check_local_paths_exposure("127.0.0.1", s)
    with pytest.raises(ConfigError, match="bind to 127.0.0.1"):
        check_local_paths_exposure("0.0.0.0", s)
    with pytest.raises(ConfigError, match="RSAE_LOCAL_PATH_ROOTS"):
        check_local_paths_exposure("127.0.0.1", Settings(data_dir=tmp_path))
    with get_sessionmaker(s.database_url).begin() as session:
        issue_token(session, "alice", "t")
    check_local_paths_exposure("localhost", s)
    with get_sessionmaker(s.database_url).begin() as session:
        issue_token(session, "bob", "t")
    with pytest.raises(ConfigError, match="2 users"):
        check_local_paths_exposure("127.0.0.1", s)
    assert Stack(s)._env("redis://x")["RSAE_ALLOW_LOCAL_PATHS"] == "false"
    assert Stack(s, local_paths=True)._env("redis://x")["RSAE_ALLOW_LOCAL_PATHS"] == "true"
    assert build_parser().parse_args(["up", "--local-paths"]).local_paths is True
    assert build_parser().parse_args(["up"]).local_paths is False
