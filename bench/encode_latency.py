"""Benchmark 7 (issue 15): latency of ``POST /v1/jobs/{id}/encode`` for a 128-token text, end to end over HTTP.

    .venv/bin/python -m bench.encode_latency                 # own embedded stack, a tiny job, 200 requests per case
    .venv/bin/python -m bench.encode_latency --quick         # 20 requests per case (~2 min with the job)
    .venv/bin/python -m bench.encode_latency --url http://127.0.0.1:8000 --token "$RSAE_TOKEN" --job <id>

What runs: without ``--url``, the embedded stack (``service.embedded.Stack``: its own ``redis-server``, a SQLite
file in a temporary folder, the GPU worker, the long-lived encode worker and uvicorn, as ``rsae-service up``
starts them), one user, a random 576 -> 2,304 ReLU teacher uploaded and upgraded by a tiny job (bundled
SmolLM2-135M, layer 3, BBC News, 128-token contexts) through the real worker. With ``--url`` an existing stack
and succeeded job are measured instead.

The text: BBC News words cut to exactly 128 tokens of the job's tokenization (one context; with the job's
conventions, no BOS and position 0 dropped, 127 positions encoded). Requests are sent one after another from one
kept-alive HTTP connection; the first request of the run (it loads the host model and the SAEs into the encode
worker: the cold start) is reported on its own and left out of the percentiles. Cases: ``which=both`` (teacher and
RSAE side by side, top_k 8), ``which=rsae``, and 64 raw activation rows (no host model run). Each figure is the
client's wall time per request (HTTP, JSON, the queue round trip, tokenization, the truncated forward, both
encodes, the reply); p50 and p99 are exact order statistics of the measured requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TINY = {
    "data": {"train_tokens": 2048, "eval_tokens": 512, "ctx_len": 128},
    "calibrate": {"steps": 5, "tokens": 512},
    "finetune": {"steps": 10, "batch_size": 256, "eval_every": 10, "control": False},
    "eval": {"ce_sequences": 0, "probe_ks": [], "probe_train_sequences": 0},
}


def text_of_128_tokens() -> str:
    """BBC News text cut to exactly 128 SmolLM2 tokens (tokenized without special tokens, as the job's data)."""
    from rsae.data import iter_documents
    from rsae.models import load_model

    _, tok = load_model("smollm2-135m")
    doc = next(d for d in iter_documents("bbc-news") if len(tok(d.text, add_special_tokens=False).input_ids) > 200)
    ids = tok(doc.text, add_special_tokens=False).input_ids[:128]
    text = tok.decode(ids)
    assert len(tok(text, add_special_tokens=False).input_ids) == 128, "the cut does not re-tokenize to 128"
    return text


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank (an observed value)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def measure(http: httpx.Client, job_id: str, body: dict[str, Any], n: int) -> list[float]:
    """Wall times (ms) of ``n`` sequential encode requests with ``body``."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = http.post(f"/v1/jobs/{job_id}/encode", json=body)
        out.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
    return out


def _figures(http: httpx.Client, job_id: str, text: str, n: int) -> list[dict]:
    cold_t = time.perf_counter()
    http.post(f"/v1/jobs/{job_id}/encode", json={"text": text}).raise_for_status()
    figs = [{"bench": "encode_latency", "name": "cold first request", "value": (time.perf_counter() - cold_t) * 1000}]
    cases = {
        "text 128 tokens, which=both": {"text": text, "top_k": 8, "which": "both"},
        "text 128 tokens, which=rsae": {"text": text, "top_k": 8, "which": "rsae"},
        "64 activation rows, which=both": {"activations": [[0.5] * 576] * 64, "top_k": 8},
    }
    for name, body in cases.items():
        ms = measure(http, job_id, body, n)
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            figs.append({"bench": "encode_latency", "name": f"{name} {label}", "value": percentile(ms, q), "n": n})
        figs.append({"bench": "encode_latency", "name": f"{name} mean", "value": statistics.fmean(ms), "n": n})
    for f in figs:
        f["unit"] = "ms"
    return figs


def _own_stack_figures(n: int) -> list[dict]:
    """Start the embedded stack in a temporary folder, run the tiny job, measure."""
    import torch

    from rsae.saes import ReLUSAE
    from service.auth import issue_token
    from service.client import upload_sae, wait_for_job
    from service.config import Settings
    from service.db import get_sessionmaker
    from service.embedded import Stack

    tmp = Path(tempfile.mkdtemp(prefix="rsae-encode-bench-"))
    sae = ReLUSAE(d_in=576, d_sae=2304)
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.save(tmp / "teacher")
    os.environ.pop("RSAE_BROKER_URL", None)
    settings = Settings(data_dir=tmp / "data", broker_url=None, database_url=f"sqlite:///{tmp / 'rsae.db'}")
    with Stack(settings, port=0, log_dir=tmp / "logs", ready_timeout=180) as stack:
        with get_sessionmaker(settings.database_url).begin() as s:
            token = issue_token(s, "bench", "encode bench").token
        with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            sae_id = upload_sae(http, tmp / "teacher")["id"]
            body = {"model": "smollm2-135m", "layer": 3, "teacher": {"sae_id": sae_id}, "settings": TINY}
            job = http.post("/v1/jobs", json=body).json()
            done = wait_for_job(http, job["id"], timeout=1800, interval=1.0)
            if done["status"] != "succeeded":
                raise RuntimeError(f"the bench job ended {done['status']}: {done['error']}")
            return _figures(http, job["id"], text_of_128_tokens(), n)


def run(quick: bool) -> list[dict]:
    """The figures of :mod:`bench.run_all`'s section 7 (an own embedded stack; 20 requests per case when quick); one
    ``skipped`` row when ``redis-server`` is not on PATH."""
    import shutil

    if shutil.which("redis-server") is None:
        return [{"bench": "encode_latency", "skipped": "redis-server is not on PATH (the embedded stack needs it)"}]
    return _own_stack_figures(20 if quick else 200)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 requests per case")
    ap.add_argument("--n", type=int, default=None, help="requests per case (default 200; 20 with --quick)")
    ap.add_argument("--url", default=None, help="an existing stack's API root (then --token and --job)")
    ap.add_argument("--token", default=os.environ.get("RSAE_TOKEN"))
    ap.add_argument("--job", default=None, help="a succeeded job of that token's user")
    a = ap.parse_args(argv)
    n = a.n or (20 if a.quick else 200)
    if a.url:
        with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {a.token}"}, timeout=120) as http:
            figs = _figures(http, a.job, text_of_128_tokens(), n)
    else:
        figs = _own_stack_figures(n)
    for f in figs:
        print(json.dumps(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
