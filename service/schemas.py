"""Request and response bodies of the HTTP API (pydantic v2).

The response models (and the teacher reference of a request) are the thin client's own
(:mod:`rsae_client.models`, re-exported here): the server builds them from rows with :func:`job_out`,
:func:`sae_out`, :func:`artifact_out` and :func:`event_out`, so the client's fields are the API's. The job
``settings`` object is built from the fields of :class:`rsae.config.UpgradeConfig` itself (same types,
defaults, bounds and descriptions), so the API and the core cannot drift apart either.
"""

from __future__ import annotations

import copy
from typing import Annotated
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator
from pydantic.fields import FieldInfo

from rsae.config import UpgradeConfig
from rsae_client.models import (
    API_PREFIX,
    JOB_EXAMPLE,
    METADATA_KEY_MAX_CHARS,
    METADATA_KEY_PATTERN,
    METADATA_MAX_KEYS,
    METADATA_VALUE_MAX_CHARS,
    ArtifactList,
    Checkpoint,
    CheckpointList,
    EncodeResult,
    EventList,
    HubRef,
    JobError,
    JobEstimate,
    JobList,
    JobStatus,
    Page,
    SaeList,
    TeacherRef,
)
from rsae_client.models import Artifact as ArtifactModel
from rsae_client.models import Dataset as DatasetModel
from rsae_client.models import Event as EventModel
from rsae_client.models import Job as JobModel
from rsae_client.models import Sae as SaeModel

from .models import Artifact, Dataset, Job, JobEvent, Sae
from .webhooks import secret_problem

__all__ = [
    "API_PREFIX",
    "JOB_EXAMPLE",
    "ArtifactList",
    "ArtifactModel",
    "Checkpoint",
    "CheckpointList",
    "EncodeResult",
    "EventList",
    "EventModel",
    "HubRef",
    "JobCreate",
    "JobError",
    "JobEstimate",
    "JobList",
    "JobMetadata",
    "JobModel",
    "JobSettings",
    "JobStatus",
    "SaeList",
    "SaeModel",
    "TeacherRef",
    "WebhookSpec",
    "artifact_out",
    "event_out",
    "job_out",
    "sae_out",
]

SETTINGS_FIELDS: tuple[str, ...] = ("data", "remez", "calibrate", "finetune", "eval", "seed")
"""The :class:`UpgradeConfig` fields a client sets under ``settings`` (model, layer, hook, teacher are top-level;
family is read from the teacher; device is the worker's choice)."""


def _core_field(name: str) -> FieldInfo:
    """A copy of :class:`UpgradeConfig`'s field ``name`` (type, default, bounds, description)."""
    return copy.copy(UpgradeConfig.model_fields[name])


JobSettings = create_model(
    "JobSettings",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Optional settings of each pipeline stage; every field defaults to the core's default.",
    **{name: (UpgradeConfig.model_fields[name].annotation, _core_field(name)) for name in SETTINGS_FIELDS},
)


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


MetadataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=METADATA_KEY_MAX_CHARS, pattern=METADATA_KEY_PATTERN)
]
MetadataValue = Annotated[str, StringConstraints(max_length=METADATA_VALUE_MAX_CHARS)]
JobMetadata = Annotated[
    dict[MetadataKey, MetadataValue],
    Field(
        max_length=METADATA_MAX_KEYS,
        description=f"Your own string labels of the job (at most {METADATA_MAX_KEYS} keys of 1-"
        f"{METADATA_KEY_MAX_CHARS} characters [A-Za-z0-9_.:-], values of at most {METADATA_VALUE_MAX_CHARS} "
        "characters), echoed on the job and usable as a list filter: GET /v1/jobs?metadata[key]=value.",
        examples=[{"experiment": "gate-sweep", "owner": "alice"}],
    ),
]
"""A job's ``metadata``: string keys and values, size-limited like Stripe's metadata (422 naming the field)."""


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m",
                    "layer": 3,
                    "teacher": {"sae_id": "6f1c2a9e-3b4d-4c5e-8f70-1a2b3c4d5e6f"},
                    "settings": {"finetune": {"steps": 600}},
                    "metadata": {"experiment": "gate-sweep"},
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
    metadata: JobMetadata = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_name_length(cls, v: str) -> str:
        """A model name of at most 1000 characters and 255 per '/'-separated part (a longer name is neither a hub
        id nor a path the file system takes; it used to be an OSError, a 500, while the model was resolved)."""
        if len(v) > 1000 or any(len(part) > 255 for part in v.split("/")):
            raise ValueError("model must be at most 1000 characters, and at most 255 between two '/'")
        return v


def sae_out(row: Sae) -> SaeModel:
    """The API's view of a ``saes`` row (``source`` from the stored cfg's ``metadata.source``, without any
    server path)."""
    meta = (row.cfg or {}).get("metadata") or {}
    source = meta.get("source") if isinstance(meta, dict) else None
    return SaeModel(
        id=row.id,
        name=row.name,
        family=row.family,
        architecture=row.architecture,
        d_in=row.d_in,
        d_sae=row.d_sae,
        sha256=row.sha256,
        created_at=row.created_at,
        source={k: v for k, v in source.items() if k != "path"} if isinstance(source, dict) else None,
    )


def artifact_out(row: Artifact) -> ArtifactModel:
    """The API's view of an ``artifacts`` row; ``url`` is its download path under ``/v1``."""
    return ArtifactModel(
        name=row.name,
        kind=row.kind,
        content_type=row.content_type,
        size=row.size,
        sha256=row.sha256,
        url=f"{API_PREFIX}/jobs/{row.job_id}/artifacts/{quote(row.name)}",
    )


def job_out(row: Job) -> JobModel:
    """The API's view of a ``jobs`` row (its artifacts loaded); a webhook secret is shown as ``***``."""
    request = dict(row.request)
    if isinstance(request.get("webhook"), dict):  # the shared secret is never echoed
        request["webhook"] = {**request["webhook"], "secret": "***"}
    return JobModel(
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
        metadata=row.job_metadata or {},
        request=request,
        metrics=row.metrics,
        error=row.error,
        artifacts=[artifact_out(a) for a in row.artifacts],
        deleted_at=row.deleted_at,
        expired_at=row.expired_at,
    )


def event_out(row: JobEvent) -> EventModel:
    """The API's view of a ``job_events`` row."""
    return EventModel.model_validate(row, from_attributes=True)


class DatasetOut(DatasetModel):
    """An uploaded text corpus (``POST /datasets``); a job reads it with ``settings.data.dataset =
    "upload:<id>"`` (the ``use_as`` value). The client's :class:`rsae_client.models.Dataset`, built from a row."""

    @classmethod
    def from_row(cls, row: Dataset) -> "DatasetOut":
        """From a ``datasets`` row."""
        return cls(
            id=row.id,
            name=row.name,
            format=row.format,
            text_column=row.text_column,
            documents=row.documents,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            created_at=row.created_at,
            use_as=f"upload:{row.id}",
        )


class DatasetList(Page[DatasetOut]):
    """A page of your uploaded corpora, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": DatasetOut.model_config["json_schema_extra"]["examples"],  # type: ignore[index]
                    "has_more": False,
                    "next_cursor": None,
                }
            ]
        }
    )
