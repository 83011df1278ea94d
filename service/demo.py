"""``rsae-service demo``: the whole product on one machine, over HTTP.

Starts the embedded stack (own Redis unless ``RSAE_BROKER_URL``; SQLite unless ``RSAE_DATABASE_URL``;
data in ``./var/demo`` unless ``RSAE_DATA_DIR``), trains a teacher ReLU SAE on the bundled model and
text (once; reused afterwards), uploads it, runs an upgrade job with default settings, downloads and
verifies the artifacts, and prints the teacher-vs-RSAE metrics table and the equivalent curl commands.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx

from rsae.config import DEFAULT_MODEL
from rsae_client import Job

from .auth import issue_token
from .client import ApiError, download_artifacts, submit_job, upload_sae, wait_for_job
from .config import Settings
from .db import get_sessionmaker
from .embedded import Stack

DEMO_LAYER = 3
UP_URL = "http://127.0.0.1:8000"
"""Where ``rsae-service up`` listens by default (the demo's own server is gone when it prints curl lines)."""
TEACHER = {
    "model": DEFAULT_MODEL,
    "layer": DEMO_LAYER,
    "d_sae": 2304,
    "train_tokens": 32768,
    "steps": 600,
    "batch_size": 1024,
    "seed": 0,
}
"""Arguments of :func:`rsae.teacher.train_teacher_from_text` for the demo teacher (sized so that the whole
demo ends within 10 minutes on a 2-core CPU; see README)."""


def _say(msg: str = "", end: str = "\n") -> None:
    print(msg, end=end, flush=True)


def demo_settings() -> Settings:
    """Settings with the data dir defaulting to ``./var/demo`` (``RSAE_DATA_DIR`` wins)."""
    return Settings() if "RSAE_DATA_DIR" in os.environ else Settings(data_dir=Path("var/demo"))


def ensure_teacher(folder: Path) -> Path:
    """Train the demo teacher into ``folder`` unless it already holds a ``cfg.json``."""
    if (folder / "cfg.json").is_file():
        _say(f"teacher: reusing {folder}")
        return folder
    from rsae.teacher import train_teacher_from_text

    def progress(frac: float) -> None:
        """Print the training progress in place."""
        _say(f"\rtraining teacher SAE: {100 * frac:5.1f}%", end="")

    _say(
        f"teacher: training a {TEACHER['d_sae']}-latent ReLU SAE on {TEACHER['model']} layer {DEMO_LAYER} "
        f"({TEACHER['train_tokens']} tokens, {TEACHER['steps']} steps) into {folder}"
    )
    out = train_teacher_from_text(out=folder, on_progress=progress, **TEACHER)
    _say()
    return Path(out)


def metrics_table(report: dict[str, Any]) -> str:
    """The teacher / RSAE-at-init / RSAE / control table of ``report["metrics"]`` (see :mod:`rsae.cli`)."""
    import io

    from rsae.cli import print_metrics_table

    buf = io.StringIO()
    print_metrics_table(report, file=buf)
    return buf.getvalue().rstrip()


def curl_commands(base: str, teacher: Path, body: dict[str, Any], job_id: str) -> str:
    """The curl equivalents of what the demo did over HTTP (token in ``$RSAE_TOKEN``)."""
    q = shlex.quote
    auth = '-H "Authorization: Bearer $RSAE_TOKEN"'
    return "\n".join(
        [
            "export RSAE_TOKEN=$(rsae-service token create --user $USER)",
            f"curl -sS {auth} -F cfg=@{q(str(teacher / 'cfg.json'))} "
            f"-F weights=@{q(str(teacher / 'sae_weights.safetensors'))} -F name=demo-teacher {base}/v1/saes",
            f"curl -sS {auth} -X POST -H 'Content-Type: application/json' -d {q(json.dumps(body))} {base}/v1/jobs",
            f"curl -sS {auth} {base}/v1/jobs/{job_id}",
            f"curl -sS {auth} {base}/v1/jobs/{job_id}/artifacts",
            f"curl -sS {auth} -OJ {base}/v1/jobs/{job_id}/artifacts/sae_weights.safetensors",
        ]
    )


def _print_progress(job: Job) -> None:
    _say(f"\rjob {job.id[:8]}: {job.status:<10} stage {job.stage or '-':<10} {100 * job.progress:5.1f}%", end="")


def run_demo(port: int = 0, timeout: float = 3 * 3600) -> int:
    """Run the demo; returns the exit code (0 on success, 1 if the job or a step fails)."""
    settings = demo_settings()
    _say(f"data dir: {settings.data_dir}")
    with Stack(settings, port=port, log_dir=settings.data_dir / "logs") as stack:
        base = stack.base_url
        _say(
            f"service: {base} (worker, API{'' if settings.broker_url else ', Redis'} started; logs in "
            f"{settings.data_dir / 'logs'})"
        )
        try:
            teacher = ensure_teacher(settings.data_dir / "teacher")
            with get_sessionmaker(settings.database_url).begin() as s:
                token = issue_token(s, "demo", "rsae-service demo").token
            with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
                sae = upload_sae(client, teacher, name="demo-teacher")
                _say(f"uploaded teacher: sae id {sae.id} ({sae.family}, {sae.d_in} -> {sae.d_sae})")
                body = {"model": DEFAULT_MODEL, "layer": DEMO_LAYER, "teacher": {"sae_id": sae.id}}
                job = submit_job(client, body)
                _say(f"submitted job {job.id}")
                job = wait_for_job(client, job.id, timeout=timeout, interval=2.0, on_update=_print_progress)
                _say()
                if job.status != "succeeded":
                    err = job.error
                    print(
                        f"job {job.status}: {err.code if err else None}: {err.detail if err else None}"
                        + (f" [field {err.field}]" if err and err.field else ""),
                        file=sys.stderr,
                    )
                    return 1
                paths = download_artifacts(client, job, settings.data_dir / "downloads" / job.id)
        except (ApiError, TimeoutError, ValueError, RuntimeError) as e:
            _say()
            print(f"demo failed: {e}", file=sys.stderr)
            tails = stack.log_tails(20)
            if tails:
                print(tails, file=sys.stderr)
            return 1
        report = json.loads(paths["report.json"].read_text())
        _say("\n" + metrics_table(report) + "\n")
        _say("artifacts (sha256 verified):")
        for name, path in paths.items():
            _say(f"  {name:<28} {path}")
    _say(
        f"\nthe same with curl, against 'rsae-service up' (default {UP_URL}; ids differ on a new run):\n"
        + curl_commands(UP_URL, teacher, body, job["id"])
    )
    return 0
