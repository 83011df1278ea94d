"""Request and response bodies of the HTTP API (pydantic v2).

The job ``settings`` object is built from the fields of :class:`rsae.config.UpgradeConfig` itself (same
types, defaults, bounds and descriptions), so the API and the core cannot drift apart.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from rsae.config import UpgradeConfig

from .models import JOB_STATUSES, Artifact, Job, JobEvent, Sae
from .webhooks import secret_problem

SETTINGS_FIELDS: tuple[str, ...] = ("data", "remez", "calibrate", "finetune", "eval", "seed")
"""The :class:`UpgradeConfig` fields a client sets under ``settings`` (model, layer, hook, teacher are top-level;
family is read from the teacher; device is the worker's choice)."""

JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]


def _core_field(name: str) -> FieldInfo:
    """A copy of :class:`UpgradeConfig`'s field ``name`` (type, default, bounds, description)."""
    return copy.copy(UpgradeConfig.model_fields[name])


JobSettings = create_model(
    "JobSettings",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Optional settings of each pipeline stage; every field defaults to the core's default.",
    **{name: (UpgradeConfig.model_fields[name].annotation, _core_field(name)) for name in SETTINGS_FIELDS},
)


class HubRef(BaseModel):
    """A teacher on the Hugging Face hub: a SAELens ``release`` + ``sae_id``, or a ``repo_id`` (+ folder).

    Only ids are accepted (never URLs); the worker fetches them with the hub client (honouring
    ``HF_HUB_OFFLINE`` and the local cache) and reads any of the four supported formats.
    """

    model_config = ConfigDict(extra="forbid")

    repo_id: str | None = Field(None, max_length=200, description="'org/name'.")
    subfolder: str | None = Field(None, max_length=500, description="Folder of the SAE inside the repo.")
    revision: str | None = Field(None, max_length=100, description="Branch, tag or commit (default main).")
    release: str | None = Field(None, max_length=200, description="SAELens release name.")
    sae_id: str | None = Field(None, max_length=500, description="SAE id within the SAELens release.")


class TeacherRef(BaseModel):
    """The teacher SAE: exactly one of an uploaded SAE id, a hub reference or a server-side folder."""

    model_config = ConfigDict(extra="forbid")

    sae_id: str | None = Field(None, max_length=64, description="Id returned by POST /saes.")
    hub: HubRef | None = Field(None, description="A hub reference, resolved by the worker.")
    path: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Absolute server-side folder (SAELens layout); only when the "
        "server sets RSAE_ALLOW_LOCAL_PATHS=true.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "TeacherRef":
        if sum(v is not None for v in (self.sae_id, self.hub, self.path)) != 1:
            raise ValueError("give exactly one of 'sae_id', 'hub' or 'path'")
        return self


JOB_EXAMPLE: dict[str, Any] = {
    "id": "3d0c8a57-1f0e-4f0b-9a43-8e2f7c9d6b11",
    "status": "succeeded",
    "stage": "package",
    "progress": 1.0,
    "attempt": 1,
    "created_at": "2026-11-23T10:00:00Z",
    "updated_at": "2026-11-23T10:04:41Z",
    "started_at": "2026-11-23T10:00:01Z",
    "finished_at": "2026-11-23T10:04:41Z",
    "deadline_at": "2026-11-23T16:00:00Z",
    "checkpoint": {"stage": "finetune", "step": 600},
    "resumed_from": None,
    "request": {
        "model": "smollm2-135m",
        "layer": 3,
        "teacher": {"sae_id": "6f1c2a9e-3b4d-4c5e-8f70-1a2b3c4d5e6f"},
        "settings": {"finetune": {"steps": 600}},
    },
    "metrics": {
        "teacher_mse": 1328.4,
        "rsae_mse": 1128.6,
        "teacher_l0": 70.8,
        "rsae_l0": 65.8,
        "teacher_delta_ce": 0.946,
        "rsae_delta_ce": 0.635,
    },
    "error": None,
    "artifacts": [
        {
            "name": "sae_weights.safetensors",
            "kind": "weights",
            "content_type": "application/octet-stream",
            "size": 10637600,
            "sha256": "9f2c0e1b7a4d3c6e8f5a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
            "url": "/jobs/3d0c8a57-1f0e-4f0b-9a43-8e2f7c9d6b11/artifacts/sae_weights.safetensors",
        }
    ],
}
"""An example job object (OpenAPI examples)."""


class WebhookSpec(BaseModel):
    """Where to POST a signed notice when the job ends (see :mod:`service.webhooks`)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        ...,
        min_length=8,
        max_length=2048,
        pattern=r"^https?://",
        description="http(s) URL; its host must be in the server's RSAE_WEBHOOK_ALLOWED_HOSTS, its port in "
        "RSAE_WEBHOOK_ALLOWED_PORTS (80 and 443 by default), and its addresses public (see service.webhooks).",
    )
    secret: str = Field(
        ...,
        min_length=16,
        max_length=256,
        description="Key of the Standard Webhooks signature (HMAC-SHA256), never echoed back: either "
        "'whsec_<base64>' (the key bytes, as Standard Webhooks tools generate) or any other string, whose "
        "UTF-8 bytes are the key (a receiver's library then takes 'whsec_' + base64(secret)).",
    )

    @field_validator("secret")
    @classmethod
    def _secret_usable(cls, value: str) -> str:
        """A ``whsec_`` secret must be base64 of at least 16 bytes (:func:`service.webhooks.secret_problem`)."""
        problem = secret_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class JobCreate(BaseModel):
    """Body of ``POST /jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m",
                    "layer": 3,
                    "teacher": {"sae_id": "6f1c2a9e-3b4d-4c5e-8f70-1a2b3c4d5e6f"},
                    "settings": {"finetune": {"steps": 600}},
                },
                {
                    "model": "smollm2-135m",
                    "layer": 3,
                    "teacher": {"sae_id": "6f1c2a9e-3b4d-4c5e-8f70-1a2b3c4d5e6f"},
                    "settings": {"data": {"train_tokens": 65536}, "remez": {"p": 5, "q": 4}},
                    "webhook": {"url": "https://hooks.example.org/rsae", "secret": "a-long-random-shared-secret"},
                },
            ]
        },
    )

    model: str = _core_field("model")
    layer: int | None = _core_field("layer")
    hook: str | None = _core_field("hook")
    teacher: TeacherRef
    settings: JobSettings = Field(default_factory=JobSettings)  # type: ignore[valid-type]
    webhook: WebhookSpec | None = Field(None, description="Optional signed notice when the job ends.")

    @field_validator("model")
    @classmethod
    def _model_name_length(cls, v: str) -> str:
        """A model name of at most 1000 characters and 255 per '/'-separated part (a longer name is neither a hub
        id nor a path the file system takes; it used to be an OSError, a 500, while the model was resolved)."""
        if len(v) > 1000 or any(len(part) > 255 for part in v.split("/")):
            raise ValueError("model must be at most 1000 characters, and at most 255 between two '/'")
        return v


class SaeOut(BaseModel):
    """An uploaded teacher SAE."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "6f1c2a9e-3b4d-4c5e-8f70-1a2b3c4d5e6f",
                    "name": "layer-3-relu",
                    "family": "relu",
                    "architecture": "standard",
                    "d_in": 576,
                    "d_sae": 2304,
                    "sha256": "a79fae84b2422520a5dfce0ffc2da66119eec038c3297cc4e24449d71ed48bbb",
                    "created_at": "2026-11-23T09:58:12Z",
                    "source": {
                        "format": "saelens",
                        "family": "relu",
                        "source_architecture": "standard",
                        "d_in": 576,
                        "d_sae": 2304,
                        "apply_b_dec_to_input": True,
                        "k": None,
                        "conventions": ["apply_b_dec_to_input=True (from cfg.json)"],
                        "hook_name": "blocks.3.hook_resid_post",
                        "hook_layer": 3,
                        "model_name": "smollm2-135m",
                        "files": {"cfg.json": "b2a7...", "sae_weights.safetensors": "a79f..."},
                    },
                }
            ]
        }
    )

    id: str
    name: str | None
    family: str
    architecture: str
    d_in: int
    d_sae: int
    sha256: str = Field(description="SHA-256 of the uploaded weights file.")
    created_at: datetime
    source: dict[str, Any] | None = Field(
        None,
        description="How the upload was read: format (saelens, gemma_scope, sparsify, "
        "dictionary_learning), source architecture, conventions detected and applied (transposes, b_dec "
        "handling, where k was found, folded normalisation), hook and model when the files name them.",
    )

    @classmethod
    def from_row(cls, row: Sae) -> "SaeOut":
        """From a ``saes`` row (``source`` from the stored cfg's ``metadata.source``)."""
        meta = (row.cfg or {}).get("metadata") or {}
        source = meta.get("source") if isinstance(meta, dict) else None
        return cls(
            id=row.id,
            name=row.name,
            family=row.family,
            architecture=row.architecture,
            d_in=row.d_in,
            d_sae=row.d_sae,
            sha256=row.sha256,
            created_at=row.created_at,
            source={k: v for k, v in source.items() if k != "path"}  # a server path: not shown
            if isinstance(source, dict)
            else None,
        )


class ArtifactOut(BaseModel):
    """One downloadable file of a job."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE["artifacts"][0]]})

    name: str
    kind: str
    content_type: str
    size: int
    sha256: str
    url: str = Field(description="Download path, relative to the API root.")

    @classmethod
    def from_row(cls, row: Artifact) -> "ArtifactOut":
        """From an ``artifacts`` row."""
        return cls(
            name=row.name,
            kind=row.kind,
            content_type=row.content_type,
            size=row.size,
            sha256=row.sha256,
            url=f"/jobs/{row.job_id}/artifacts/{quote(row.name)}",
        )


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    detail: str
    field: str | None = None


class JobOut(BaseModel):
    """One job as the API shows it (the SQL row; never Celery's view)."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    status: JobStatus  # type: ignore[valid-type]
    stage: str | None
    progress: float
    attempt: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None = Field(None, description="The job fails with deadline_exceeded after this.")
    checkpoint: dict[str, Any] | None = Field(
        None,
        description="Last checkpoint saved: {name, stage, step, at}; name 'state' is the "
        "pipeline state after a finished stage (step null), 'finetune-rsae' / 'finetune-control' a fine-tuning step.",
    )
    resumed_from: dict[str, Any] | None = Field(
        None,
        description="Set when a later attempt resumed the job (after a worker died): from which stage "
        "and step, and what it reused.",
    )
    request: dict[str, Any]
    metrics: dict[str, Any] | None
    error: JobError | None
    artifacts: list[ArtifactOut]
    deleted_at: datetime | None = Field(
        None, description="DELETE was asked while the job ran: it is removed once it has stopped."
    )
    expired_at: datetime | None = Field(
        None,
        description="The retention rule (RSAE_RETENTION_DAYS) deleted the job's artifacts then; downloads "
        "answer 410 Gone.",
    )

    @classmethod
    def from_row(cls, row: Job) -> "JobOut":
        """From a ``jobs`` row (its artifacts are loaded)."""
        request = dict(row.request)
        if isinstance(request.get("webhook"), dict):  # the shared secret is never echoed
            request["webhook"] = {**request["webhook"], "secret": "***"}
        return cls(
            id=row.id,
            status=row.status,
            stage=row.stage,
            progress=row.progress,
            attempt=row.attempt,
            created_at=row.created_at,
            updated_at=row.updated_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            deadline_at=row.deadline_at,
            checkpoint=row.checkpoint,
            resumed_from=row.resumed_from,
            request=request,
            metrics=row.metrics,
            error=row.error,
            artifacts=[ArtifactOut.from_row(a) for a in row.artifacts],
            deleted_at=row.deleted_at,
            expired_at=row.expired_at,
        )


class JobPage(BaseModel):
    """A page of jobs, newest first. Pass ``next_cursor`` as ``after`` to get the next page."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [JOB_EXAMPLE], "next_cursor": "WyIyMDI2LTExLTIzVDEwOjAwOjAwWiIsICIzZDBjIl0"}]
        }
    )

    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    """One job event."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 12,
                    "type": "progress",
                    "created_at": "2026-11-23T10:02:10Z",
                    "data": {"stage": "finetune", "progress": 0.52},
                },
                {
                    "id": 13,
                    "type": "metrics",
                    "created_at": "2026-11-23T10:02:12Z",
                    "data": {"stage": "finetune", "step": 300, "mse": 1180.2, "l0": 66.1},
                },
            ]
        }
    )

    id: int
    type: str
    created_at: datetime
    data: dict[str, Any]

    @classmethod
    def from_row(cls, row: JobEvent) -> "EventOut":
        """From a ``job_events`` row."""
        return cls.model_validate(row, from_attributes=True)
