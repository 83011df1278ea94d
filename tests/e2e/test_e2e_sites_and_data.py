"""Issue 12's features end to end over HTTP, through the real uvicorn and the real Celery worker (the stack of
``test_e2e.py``): one teacher per hook site of SmolLM2 (``blocks.2.hook_resid_pre``, ``blocks.2.hook_mlp_out``
and ``blocks.1.attn.hook_z``, the 9 heads' z flattened to 576 as SAELens's ``reshape_activations: "hook_z"``),
each named only by the teacher's cfg; a job on a corpus uploaded with ``POST /v1/datasets`` (.jsonl) whose
training activations are streamed; a job on a Hugging Face data set id (config, split, revision, text column)
read from a ``datasets`` cache prepared in the test from real BBC News text, the worker running with
``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` and ``HF_DATASETS_CACHE`` pointing at it; and a teacher whose cfg
records ``prepend_bos: true`` and ``context_size: 256`` with no ``ctx_len`` in the request.

Each job is tiny (2,048 training rows, a few steps); each test then extracts the held-out activations again in
this process, from the site, data and conventions the report names, and recomputes the downloaded RSAE's
held-out MSE: equal to the report's only if the worker read that site, that text and those conventions.

A request naming another site than the teacher's cfg (a 422 naming ``hook`` or ``layer``) is checked without a
worker in ``tests/service/test_hook_sites.py::test_request_contradicting_the_teachers_hook_is_422_naming_the_field``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_e2e import JOB_TIMEOUT

from service.client import download_artifacts, submit_job, upload_sae, wait_for_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The running stack's fixtures (e2e_settings, stack, http) come from tests/e2e/conftest.py.

TINY = {
    "data": {"train_tokens": 2048, "eval_tokens": 512, "ctx_len": 32},
    "calibrate": {"steps": 5, "tokens": 512},
    "finetune": {"steps": 8, "batch_size": 128, "eval_every": 4, "control": False},
    "eval": {"ce_sequences": 2, "probe_ks": []},
}


def _teacher(folder: Path, metadata: dict[str, Any]) -> Path:
    """A small seeded ReLU teacher (576 -> 128) whose cfg.json ``metadata`` is ``metadata``."""
    from rsae.saes import ReLUSAE

    sae = ReLUSAE(576, 128, metadata=metadata)
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae.save(folder)


def _run(http: httpx.Client, teacher: Path, settings: dict[str, Any], out: Path) -> tuple[dict, dict, Path]:
    """Upload ``teacher``, submit a job naming no site (the teacher's is used), wait for it to succeed, download
    its artifacts to ``out``; returns (report.json, cfg.json, the folder)."""
    sae = upload_sae(http, teacher, name=teacher.name)
    job = submit_job(http, {"model": "smollm2-135m", "teacher": {"sae_id": sae["id"]}, "settings": settings})
    done = wait_for_job(http, job["id"], timeout=JOB_TIMEOUT, interval=0.5)
    assert done["status"] == "succeeded", done["error"]
    paths = download_artifacts(http, done, out)
    return json.loads(paths["report.json"].read_text()), json.loads(paths["cfg.json"].read_text()), out


def _heldout_mse(folder: Path, report: dict[str, Any], work: Path, dataset: str | None = None) -> float:
    """The held-out MSE of the RSAE in ``folder``, on activations extracted here at the report's hook site
    (``host_model.hook``), from its held-out split (``eval_split``; ``dataset`` in place of the report's public
    name) read as the job read it (``data.source``: hub config, split, revision, text column) with its context
    conventions (``data.conventions``)."""
    import rsae
    from rsae.activations import ActivationStore, extract_activations
    from rsae.data import ContextConventions, SourceOptions
    from rsae.evaluate import reconstruction_metrics
    from rsae.models import load_model

    split, host = report["eval_split"], report["host_model"]
    model, tok = load_model(split["model"])
    extract_activations(
        model,
        tok,
        layer=host["layer"],
        hook=host["hook"],
        dataset=dataset or split["dataset"],
        split="eval",
        n_tokens=split["eval_tokens"],
        out_dir=work,
        conventions=ContextConventions.from_dict(report["data"]["conventions"]),
        options=SourceOptions(**(report["data"].get("source") or {})),
        eval_fraction=split["eval_fraction"],
        seed=split["seed"],
    )
    return reconstruction_metrics(rsae.load(folder), [ActivationStore(work).load()])["mse"]


def _finite(report: dict[str, Any]) -> None:
    for name in ("teacher", "rsae"):
        m = report["metrics"][name]
        assert all(math.isfinite(m[k]) for k in ("mse", "fvu", "l0", "delta_ce")), (name, m)


@pytest.mark.parametrize(
    ("hook", "layer"), [("blocks.2.hook_resid_pre", 2), ("blocks.2.hook_mlp_out", 2), ("blocks.1.attn.hook_z", 1)]
)
def test_job_at_a_hook_site(http: httpx.Client, tmp_path: Path, hook: str, layer: int) -> None:
    """A teacher at ``hook`` (``attn.hook_z``: d_in = 9 heads x 64 = 576, cfg ``reshape_activations: "hook_z"``):
    the job reads that site (no layer or hook in the request) and the artifacts name it."""
    teacher = _teacher(tmp_path / "teacher", {"hook_name": hook})
    reshape = "hook_z" if hook.endswith("attn.hook_z") else "none"
    assert json.loads((teacher / "cfg.json").read_text())["reshape_activations"] == reshape
    report, cfg, folder = _run(http, teacher, TINY, tmp_path / "out")
    assert (report["host_model"]["hook"], report["host_model"]["layer"]) == (hook, layer)
    assert report["config"]["hook"] == hook
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_layer"]) == (hook, layer)
    assert cfg["reshape_activations"] == reshape and cfg["d_in"] == 576
    _finite(report)
    mse = _heldout_mse(folder, report, tmp_path / "heldout")
    assert mse == pytest.approx(report["metrics"]["rsae"]["mse"], rel=1e-3)


def test_streamed_job_on_an_uploaded_jsonl_corpus(http: httpx.Client, tmp_path: Path) -> None:
    """A .jsonl corpus (60 real BBC News articles) uploaded with ``POST /v1/datasets`` and named by a job as
    ``upload:<id>``, its training activations streamed: the report names the corpus by id, name and sha256, says
    the rows were streamed, and its held-out rows are the corpus's."""
    from rsae.data import iter_documents

    docs = [d.text for d in itertools.islice(iter_documents("bbc-news"), 0, 600, 10)]
    corpus = tmp_path / "corpus.jsonl"  # the name the server stores it under: the same document ids
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    r = http.post("/v1/datasets", files={"jsonl": ("news.jsonl", corpus.read_bytes())}, data={"name": "news"})
    assert r.status_code == 201, r.text
    ds = r.json()
    stream = {"activation_storage": "stream", "stream_disk_tokens": 512, "stream_buffer_tokens": 1024}
    settings = {**TINY, "data": {**TINY["data"], "dataset": ds["use_as"], **stream}}
    teacher = _teacher(tmp_path / "teacher", {"hook_name": "blocks.1.hook_resid_post"})
    report, cfg, folder = _run(http, teacher, settings, tmp_path / "out")
    name = f"{ds['use_as']} (news) sha256:{ds['sha256']}"
    assert report["data"]["train"]["dataset"] == report["eval_split"]["dataset"] == name
    assert report["data"]["storage"] == {"mode": "stream", "requested": "stream", "disk_rows": 512, "buffer_rows": 1024}
    assert report["data"]["train"]["rows"] == 2048
    _finite(report)
    mse = _heldout_mse(folder, report, tmp_path / "heldout", dataset=str(corpus))
    assert mse == pytest.approx(report["metrics"]["rsae"]["mse"], rel=1e-3)


def test_job_whose_teacher_records_prepend_bos_and_context_256(http: httpx.Client, tmp_path: Path) -> None:
    """A teacher whose cfg records SAELens's ``prepend_bos: true`` and ``context_size: 256``, and a request with no
    ``ctx_len``: the job's sequences are 256 tokens starting with BOS, and the report and cfg.json record both as
    the teacher's."""
    meta = {"hook_name": "blocks.1.hook_resid_post", "prepend_bos": True, "context_size": 256}
    data = {k: v for k, v in TINY["data"].items() if k != "ctx_len"}
    report, cfg, folder = _run(http, _teacher(tmp_path / "bos-teacher", meta), {**TINY, "data": data}, tmp_path / "out")
    conv = report["data"]["conventions"]
    assert conv["prepend_bos"] is True and conv["sources"]["prepend_bos"] == "teacher"
    assert conv["context_size"] == 256 and conv["sources"]["context_size"] == "teacher"
    assert report["data"]["train"]["ctx_len"] == report["eval_split"]["ctx_len"] == 256
    assert cfg["metadata"]["prepend_bos"] is True and cfg["metadata"]["context_size"] == 256
    _finite(report)
    mse = _heldout_mse(folder, report, tmp_path / "heldout")
    assert mse == pytest.approx(report["metrics"]["rsae"]["mse"], rel=1e-3)
    no_bos = {**report, "data": {**report["data"], "conventions": {**conv, "prepend_bos": False}}}
    assert _heldout_mse(folder, no_bos, tmp_path / "no-bos") != pytest.approx(mse, rel=1e-3)  # BOS mattered


class TestHubDatasetFromOfflineCache:
    """A job naming a Hugging Face data set id, read by the worker from a prepared offline ``datasets`` cache."""

    HUB_ID = "acme/bbc-news-sample"

    @pytest.fixture
    def e2e_settings(self, e2e_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
        """The stack's settings, with the cache of :attr:`HUB_ID` (100 real BBC News articles in column
        ``content`` of split ``train``; 3 in ``validation``) under ``tmp_path/hf`` and ``HF_DATASETS_CACHE``,
        ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` in the environment the stack's processes inherit (and
        in this process, for the local recomputation)."""
        from rsae.data import iter_documents
        from support.hfdata import hf_offline, prepare_hf_cache

        texts = [d.text for d in itertools.islice(iter_documents("bbc-news"), 5, 1005, 10)]
        prepare_hf_cache(
            tmp_path / "hf", self.HUB_ID, {"train": {"content": texts}, "validation": {"content": texts[:3]}}
        )
        hf_offline(monkeypatch, tmp_path / "hf")
        return e2e_settings

    def test_job_on_a_hub_dataset_read_offline(self, http: httpx.Client, tmp_path: Path) -> None:
        """The job names the hub id with config, split, revision and text column: the report names the data set
        and how it was read, and the held-out MSE recomputes from the cached text."""
        source = {"hf_config": "default", "hf_split": "train", "hf_revision": "main", "text_column": "content"}
        settings = {**TINY, "data": {**TINY["data"], "dataset": self.HUB_ID, **source}}
        teacher = _teacher(tmp_path / "teacher", {"hook_name": "blocks.1.hook_resid_post"})
        report, cfg, folder = _run(http, teacher, settings, tmp_path / "out")
        assert report["data"]["train"]["dataset"] == report["eval_split"]["dataset"] == self.HUB_ID
        assert report["data"]["source"] == source and report["config"]["data"]["dataset"] == self.HUB_ID
        assert cfg["metadata"]["dataset_path"] == self.HUB_ID
        _finite(report)
        mse = _heldout_mse(folder, report, tmp_path / "heldout")
        assert mse == pytest.approx(report["metrics"]["rsae"]["mse"], rel=1e-3)
