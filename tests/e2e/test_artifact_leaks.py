"""Issue 11: a job upgraded for real (uploaded teacher, bundled SmolLM2-135M, a few seconds of training) leaves
no server folder, host name or pid in its downloaded cfg.json, report.json, report.html or events; the
artifacts name the teacher by id, name and sha256 and the data by name.

The worker runs in-process (``worker.tasks.run_job``: the same code the Celery task calls) against the real
Postgres; the API under TestClient publishes to the real Redis.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.client import upload_sae
from service.config import Settings
from support.servers import job_body

pytestmark = pytest.mark.e2e

TINY = {
    "data": {"train_tokens": 1024, "eval_tokens": 256, "ctx_len": 32},
    "calibrate": {"steps": 5, "tokens": 256},
    "finetune": {"steps": 10, "batch_size": 128, "eval_every": 10, "control": False},
    "eval": {"ce_sequences": 0, "probe_ks": [], "probe_train_sequences": 0},
}


def test_artifacts_and_events_of_an_upgraded_job_name_no_server_folder(
    client: TestClient, settings: Settings, make_teacher: Callable[..., Path]
) -> None:
    import worker.tasks

    sae = upload_sae(client, make_teacher(d_sae=128), name="tiny teacher")
    job_id = client.post("/v1/jobs", json=job_body(sae["id"], **TINY)).json()["id"]
    assert worker.tasks.run_job(job_id, settings) == "succeeded"

    job = client.get(f"/v1/jobs/{job_id}").json()
    files = {a["name"]: client.get(a["url"]).text for a in job["artifacts"]}
    from rsae.pipeline import ARTIFACT_FILES

    assert set(files) == set(ARTIFACT_FILES)
    texts = {
        "cfg.json": files["cfg.json"],
        "report.json": files["report.json"],
        "README.md": files["README.md"],
        "core_eval_results.json": files["core_eval_results.json"],
        "report.html": re.sub(r"data:[^\"')\s]*", "", files["report.html"]),  # not embedded images' base64
        "events": client.get(f"/v1/jobs/{job_id}/events").text,
        "job": json.dumps(job),
    }
    leaks = [str(settings.data_dir), tempfile.gettempdir(), str(Path.home()), f":{os.getpid()}:"]
    host = re.compile(rf"(?<![\w.-]){re.escape(socket.gethostname())}(?![\w-])")
    for name, text in texts.items():
        for leak in leaks:
            assert leak not in text, (name, leak)
        assert not host.search(text), (name, host.search(text))

    report, cfg = json.loads(files["report.json"]), json.loads(files["cfg.json"])
    teacher_ref = f"sae:{sae['id']} (tiny teacher)"
    assert report["teacher"]["source"] == teacher_ref == report["config"]["teacher"]
    assert len(report["teacher"]["sha256"]) == 64
    assert cfg["metadata"]["teacher"]["source"] == teacher_ref
    assert cfg["metadata"]["upgrade_config"]["teacher"] == teacher_ref
    assert "path" not in (cfg["metadata"].get("source") or {})
    assert teacher_ref in files["README.md"]  # the model card names the public reference
    assert json.loads(files["core_eval_results.json"])["sae_cfg_dict"] == cfg
    assert report["data"]["train"]["dataset"] == report["eval_split"]["dataset"] == "bbc-news"
