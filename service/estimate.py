"""``POST /v1/jobs/estimate``: what a job would cost on this server's workers, from the throughput they recorded.

Recording. When a job succeeds, the worker stores a throughput record in the job row's ``metrics`` under
``throughput`` (:func:`throughput_record`): the device it ran on (:func:`rsae.device.device_label`: ``cpu`` or
``cuda:<GPU name>``), the sizes the upgrade ran with (:class:`rsae.cost.JobSizes`, from ``report.json``) and the
seconds of each stage (the report's ``timings_s``). No other table: the rows of succeeded jobs are the record,
and they outlive the retention rule (which deletes artifacts, not rows).

Estimating. The rate of a stage (work units per second, :func:`rsae.cost.stage_work`) is the total work over the
total seconds of the last :data:`RECORDS_SCANNED` succeeded jobs on the device (jobs of the same model when there
are any, else every model), skipping jobs that resumed after a worker died (their stages may have been reused) and
stage times under :data:`MIN_STAGE_SECONDS`. The device is the latest recorded one (the fleet's), else ``cpu``;
without a record on it a stage takes the documented default rate (:data:`rsae.cost.DEFAULT_RATES`, measured on the
project's CPU machine). The answer says which basis each figure has.

Limits. The same checks as ``POST /v1/jobs``, collected instead of raised: the job bounds
(:func:`service.bounds.request_bound_problems`), the active-job quota (:func:`service.policies.check_quota`) and the
storage quota (:func:`service.storage.check_storage`), each listed with the status, code, detail and field that
``POST /v1/jobs`` answers; plus a warning when the expected time passes ``RSAE_JOB_DEADLINE_SECONDS``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rsae.cost import (
    DEFAULT_RATES,
    DEFAULT_RATES_DEVICE,
    DEFAULT_RATES_MEASURED_AT,
    ESTIMATED_STAGES,
    WORK_UNITS,
    JobSizes,
    memory_estimate,
    model_param_count,
    stage_work,
)
from rsae.data import resolve_conventions
from rsae.hooknames import site_width
from rsae.models import model_shape
from rsae_client.models import (
    EstimateBasis,
    EstimateDisk,
    EstimateMemory,
    EstimateTokens,
    JobEstimate,
    LimitProblem,
    StageEstimate,
)

from . import bounds
from .config import Settings
from .jobs import build_upgrade_config
from .models import Job, User, utcnow
from .policies import check_quota, job_site
from .problems import ProblemError
from .schemas import JobCreate
from .storage import check_storage, job_output_estimates

log = logging.getLogger(__name__)

THROUGHPUT_KEY = "throughput"
"""Key of the throughput record in a succeeded job's ``metrics``."""
RECORDS_SCANNED = 50
"""Most recent succeeded jobs read for the rates."""
MIN_STAGE_SECONDS = 0.05
"""Stage times below this are not used for a rate (a stage that reused earlier work, or timer noise)."""


def throughput_record(report: dict[str, Any], device: str) -> dict[str, Any] | None:
    """The record a worker stores with a succeeded job (``metrics["throughput"]``): ``device``, ``model``,
    ``recorded_at`` (ISO 8601 UTC), ``sizes`` (:meth:`rsae.cost.JobSizes.to_dict`) and ``seconds`` (the report's
    ``timings_s``: seconds of each stage). None (logged) when the report lacks what it needs."""
    try:
        sizes = JobSizes.from_report(report)
        seconds = {k: float(v) for k, v in report["timings_s"].items()}
    except (KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        log.warning("no throughput record: the report lacks %s", e)
        return None
    return {
        "device": device,
        "model": sizes.model,
        "recorded_at": utcnow().isoformat(),
        "sizes": sizes.to_dict(),
        "seconds": seconds,
    }


@dataclass(frozen=True)
class _Sample:
    device: str
    model: str
    when: datetime
    work: dict[str, float | None]
    seconds: dict[str, float]


def recorded_samples(session: Session) -> list[_Sample]:
    """The throughput records of the last :data:`RECORDS_SCANNED` succeeded jobs (of every user), newest first;
    jobs that resumed and unreadable records are left out."""
    rows = session.execute(
        select(Job.metrics, Job.finished_at, Job.resumed_from)
        .where(Job.status == "succeeded")
        .order_by(Job.finished_at.desc())
        .limit(RECORDS_SCANNED)
    )
    out = []
    for metrics, finished_at, resumed_from in rows:
        rec = (metrics or {}).get(THROUGHPUT_KEY) if isinstance(metrics, dict) else None
        if not isinstance(rec, dict) or resumed_from:
            continue
        try:
            sizes = JobSizes.from_dict(rec["sizes"])
            seconds = {str(k): float(v) for k, v in rec["seconds"].items()}
            out.append(_Sample(str(rec["device"]), sizes.model, finished_at, stage_work(sizes), seconds))
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("unreadable throughput record skipped")
    return out


def stage_basis(samples: list[_Sample], stage: str, device: str, model: str) -> EstimateBasis:
    """The rate of ``stage`` on ``device`` (see the module's docstring) and where it comes from."""
    usable = [
        s
        for s in samples
        if s.device == device and (s.work.get(stage) or 0) > 0 and s.seconds.get(stage, 0.0) >= MIN_STAGE_SECONDS
    ]
    same = [s for s in usable if s.model == model]
    picked = same or usable
    if picked:
        rate = sum(s.work[stage] or 0.0 for s in picked) / sum(s.seconds[stage] for s in picked)
        latest = max(s.when for s in picked)
        models = sorted({s.model for s in picked})
        return EstimateBasis(
            source="measured",
            device=device,
            rate=rate,
            jobs=len(picked),
            measured_at=latest,
            detail=f"{len(picked)} succeeded job(s) on {device} ({', '.join(models)}), the latest finished "
            f"{latest:%Y-%m-%d %H:%M:%S} UTC",
        )
    return EstimateBasis(
        source="default",
        device=DEFAULT_RATES_DEVICE,
        rate=DEFAULT_RATES[stage],
        jobs=0,
        measured_at=DEFAULT_RATES_MEASURED_AT,
        detail=f"default: no job recorded on {device} yet; the service's rate measured on {DEFAULT_RATES_DEVICE} "
        f"on {DEFAULT_RATES_MEASURED_AT:%Y-%m-%d} (docs/api.md, 'Estimates')",
    )


def _teacher_cfg(teacher_path: str) -> dict[str, Any] | None:
    """The teacher's ``cfg.json`` (an upload's or a server-side folder's), or None (a hub teacher)."""
    if not teacher_path:
        return None
    try:
        cfg = json.loads((Path(teacher_path) / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def request_sizes(req: JobCreate, teacher_path: str) -> tuple[JobSizes, dict | None]:
    """The sizes of the job ``req`` as far as the API knows them (a validated request; ``teacher_path`` from
    :func:`service.policies.validate_job_request`), and the model's ``config.json`` (None: not at hand)."""
    cfg = build_upgrade_config(req, teacher_path)
    teacher = _teacher_cfg(teacher_path) or {}
    site, config = job_site(req, teacher_path)
    shape = model_shape(req.model) or (None, None)
    width = site_width(config, site) if config is not None and site is not None else None
    meta = teacher.get("metadata")
    ctx = resolve_conventions(cfg.data.requested_conventions(), meta if isinstance(meta, dict) else None)
    sizes = JobSizes.from_config(
        cfg,
        n_layers=_int(shape[0]),
        d_model=_int(shape[1]),
        layer=site.layer if site is not None else None,
        d_in=_int(width) or _int(teacher.get("d_in")),
        d_sae=_int(teacher.get("d_sae")),
        ctx_len=ctx.context_size,
    )
    return sizes, config


def _stages(sizes: JobSizes, samples: list[_Sample], device: str) -> list[StageEstimate]:
    work = stage_work(sizes)
    out = []
    for stage in ESTIMATED_STAGES:
        w = work[stage]
        if w is None:
            basis = EstimateBasis(
                source="unknown",
                device=device,
                detail="a size this stage depends on (the teacher's d_sae or d_in, the hook's layer, the model's "
                "width) is known only once the worker has fetched the teacher or the model",
            )
            out.append(StageEstimate(stage=stage, seconds=None, work=None, unit=WORK_UNITS[stage], basis=basis))
            continue
        basis = stage_basis(samples, stage, device, sizes.model)
        seconds = round(w / basis.rate, 2) if basis.rate else None
        out.append(StageEstimate(stage=stage, seconds=seconds, work=w, unit=WORK_UNITS[stage], basis=basis))
    return out


def _problem(e: ProblemError) -> LimitProblem:
    return LimitProblem(status=e.status, code=e.code, detail=e.detail, field=e.field, extra=e.extra)


def limit_problems(
    session: Session, settings: Settings, req: JobCreate, user: User, artifacts_bytes: int
) -> list[LimitProblem]:
    """Every limit ``POST /v1/jobs`` would refuse ``req`` for, in its order: job bounds (422), unfinished jobs
    (429 ``too_many_jobs``), storage quota (413 ``storage_quota_exceeded``). Writes nothing the caller keeps
    (the storage check may measure old uploads into ``session``: roll it back)."""
    problems = [_problem(e) for e in bounds.request_bound_problems(session, settings, req)]
    try:
        check_quota(session, user, settings)
    except ProblemError as e:
        problems.append(_problem(e))
    try:
        check_storage(session, settings, user.id, artifacts_bytes, what="this job's estimated artifacts")
    except ProblemError as e:
        problems.append(_problem(e))
    return problems


def _deadline_warning(total: float | None, settings: Settings) -> list[LimitProblem]:
    if total is None or total <= settings.job_deadline_seconds:
        return []
    return [
        LimitProblem(
            status=None,
            code="deadline_exceeded",
            detail=f"the job is expected to take {total:,.0f} s, more than this server's job deadline of "
            f"{settings.job_deadline_seconds:,.0f} s (RSAE_JOB_DEADLINE_SECONDS): it would likely fail with "
            "deadline_exceeded; lower settings.data.train_tokens or settings.finetune.steps",
            field="settings",
        )
    ]


def estimate_job(session: Session, settings: Settings, req: JobCreate, user: User, teacher_path: str) -> JobEstimate:
    """The estimate of the validated request ``req`` of ``user`` (see the module's docstring). Creates nothing;
    the caller rolls ``session`` back.

    Raises:
        ProblemError: a refusal of the job bounds that is not a limit (as ``POST /v1/jobs``, e.g. 422
            ``invalid_model`` when the hub says the model does not exist).
    """
    sizes, config = request_sizes(req, teacher_path)
    samples = recorded_samples(session)
    device = samples[0].device if samples else "cpu"
    stages = _stages(sizes, samples, device)
    seconds = [s.seconds for s in stages]
    total = round(sum(seconds), 2) if all(x is not None for x in seconds) else None  # type: ignore[misc]
    mem = memory_estimate(sizes, model_param_count(config), (config or {}).get("vocab_size"), device)
    artifacts = job_output_estimates(session, [req.model_dump(mode="json")])[0]
    d_model, _ = bounds.job_width(session, req, teacher_path or None)
    limits = limit_problems(session, settings, req, user, artifacts)
    return JobEstimate(
        device=device,
        tokens=EstimateTokens(
            train=sizes.train_tokens,
            eval=sizes.eval_tokens,
            finetune_rows=sizes.finetune_rows,
            calibrate=sizes.calibrate_tokens,
            ce=sizes.ce_tokens,
        ),
        disk=EstimateDisk(
            activations_bytes=bounds.scratch_bytes(req, d_model) if d_model else None,
            artifacts_bytes=artifacts if req.teacher.sae_id is not None else None,
        ),
        memory=EstimateMemory(host_bytes=mem.host, accelerator_bytes=mem.accelerator),
        stages=stages,
        total_seconds=total,
        allowed_to_proceed=not limits,
        limits_exceeded=limits,
        warnings=_deadline_warning(total, settings),
    )
