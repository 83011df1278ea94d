"""Typed bodies of the RSAE service's API (pydantic v2), shared by the server and the client.

The server's response models *are* these classes: ``service/schemas.py`` imports them and only adds the
conversion from database rows, so the OpenAPI schema and this client cannot drift apart. Nothing here
imports torch, numpy or the server's packages.

Every list route answers one envelope, :class:`Page`: ``{"data": [...], "has_more": bool, "next_cursor":
str | null}``; pass ``next_cursor`` back as the ``after`` query parameter for the next page (the shape of
Stripe's and OpenAI's list APIs).

For scripts written against the dict-returning client, every model also answers ``model["field"]``
(:meth:`ApiModel.__getitem__`); attribute access (``job.status``) is the typed way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_PREFIX = "/v1"
"""Path prefix of every versioned route (``/v1/jobs``...); the old unversioned paths answer 308 to it."""

JOB_STATUSES: tuple[str, ...] = (
    "queued",
    "running",
    "publishing",
    "succeeded",
    "failed",
    "cancelling",
    "cancelled",
)
"""Every value of a job's ``status`` (``jobs.status`` on the server)."""
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
"""Statuses a job never leaves."""

JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]

METADATA_MAX_KEYS = 16
"""Most keys of a job's ``metadata``."""
METADATA_KEY_MAX_CHARS = 40
"""Longest ``metadata`` key."""
METADATA_VALUE_MAX_CHARS = 500
"""Longest ``metadata`` value."""
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.:-]+$"
"""Characters a ``metadata`` key may use (no brackets, so ``?metadata[key]=value`` filters stay unambiguous)."""


class ApiModel(BaseModel):
    """Base of every response model: pydantic, unknown fields ignored (a newer server may add fields), and
    ``model["name"]`` as a read-only alias of ``model.name`` for code written against the dict-returning client.
    """

    def __getitem__(self, name: str) -> Any:
        """``model["name"]`` is ``model.name``.

        Raises:
            KeyError: the model has no such field.
        """
        if name not in type(self).model_fields:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        """``model.name`` if the model has that field, else ``default`` (like ``dict.get``)."""
        return getattr(self, name) if name in type(self).model_fields else default


T = TypeVar("T")


class Page(ApiModel, Generic[T]):
    """One page of a list: ``data`` in the route's order; ``has_more`` is true when another page follows,
    whose ``after`` query parameter is ``next_cursor`` (null on the last page)."""

    data: list[T]
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(description="Pass as 'after' for the next page; null on the last page.")


# -- request parts shared with the server -----------------------------------------------------------------------
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

    sae_id: str | None = Field(None, max_length=64, description="Id returned by POST /v1/saes.")
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


# -- responses --------------------------------------------------------------------------------------------------
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
    "metadata": {"experiment": "gate-sweep", "owner": "alice"},
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
            "url": "/v1/jobs/3d0c8a57-1f0e-4f0b-9a43-8e2f7c9d6b11/artifacts/sae_weights.safetensors",
        }
    ],
}
"""An example job object (OpenAPI examples)."""


class Sae(ApiModel):
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


class Artifact(ApiModel):
    """One downloadable file of a job."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE["artifacts"][0]]})

    name: str
    kind: str
    content_type: str
    size: int = Field(description="Bytes.")
    sha256: str
    url: str = Field(description="Download path, relative to the API root (/v1/jobs/{id}/artifacts/{name}).")


class JobError(ApiModel):
    """Why a job failed."""

    code: str
    detail: str
    field: str | None = None


class Job(ApiModel):
    """One job as the API shows it (the SQL row; never Celery's view)."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    status: JobStatus  # type: ignore[valid-type]
    stage: str | None
    progress: float = Field(description="0 to 1.")
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
    metadata: dict[str, str] = Field(
        default_factory=dict, description="The string key/values given at creation (filter: ?metadata[key]=value)."
    )
    request: dict[str, Any]
    metrics: dict[str, Any] | None
    error: JobError | None
    artifacts: list[Artifact]
    deleted_at: datetime | None = Field(
        None, description="DELETE was asked while the job ran: it is removed once it has stopped."
    )
    expired_at: datetime | None = Field(
        None,
        description="The retention rule (RSAE_RETENTION_DAYS) deleted the job's artifacts then; downloads "
        "answer 410 Gone.",
    )

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


class Event(ApiModel):
    """One job event (``status``, ``progress``, ``metrics`` or ``log``)."""

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


class Checkpoint(ApiModel):
    """One checkpoint the worker saved, with the metrics last recorded at or before its step."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "finetune-rsae",
                    "stage": "finetune",
                    "step": 300,
                    "attempt": 1,
                    "created_at": "2026-11-23T10:02:12Z",
                    "metrics": {"step": 300, "mse": 1180.2, "l0": 66.1},
                }
            ]
        }
    )

    name: str | None = Field(
        None, description="'state' (pipeline state after a finished stage), 'finetune-rsae' or 'finetune-control'."
    )
    stage: str | None
    step: int | None = Field(None, description="Optimiser step within the stage; null for a stage-state checkpoint.")
    attempt: int | None = Field(None, description="The job attempt that saved it.")
    created_at: datetime
    metrics: dict[str, Any] | None = Field(
        None,
        description="The stage's metrics event at this step (or the last one before it); null when none was recorded.",
    )


def _page_example(item: dict[str, Any], cursor: str | None = None) -> ConfigDict:
    return ConfigDict(
        json_schema_extra={"examples": [{"data": [item], "has_more": cursor is not None, "next_cursor": cursor}]}
    )


class JobList(Page[Job]):
    """A page of jobs, newest first."""

    model_config = _page_example(JOB_EXAMPLE, "WyIyMDI2LTExLTIzVDEwOjAwOjAwWiIsICIzZDBjIl0")


class SaeList(Page[Sae]):
    """A page of uploaded SAEs, newest first."""

    model_config = _page_example(Sae.model_config["json_schema_extra"]["examples"][0])  # type: ignore[index]


class EventList(Page[Event]):
    """A page of a job's events, oldest first (``next_cursor`` is the last event's id)."""

    model_config = _page_example(Event.model_config["json_schema_extra"]["examples"][0], "12")  # type: ignore[index]


class ArtifactList(Page[Artifact]):
    """A job's artifacts (all of them: ``has_more`` is always false)."""

    model_config = _page_example(JOB_EXAMPLE["artifacts"][0])


class CheckpointList(Page[Checkpoint]):
    """A job's checkpoints, oldest first (all of them: ``has_more`` is always false)."""

    model_config = _page_example(Checkpoint.model_config["json_schema_extra"]["examples"][0])  # type: ignore[index]


DATASET_FORMATS: tuple[str, ...] = ("txt", "jsonl", "parquet")
"""The file fields of ``POST /v1/datasets`` (one per upload), which are also the corpus formats."""


class Dataset(ApiModel):
    """An uploaded text corpus (``POST /v1/datasets``); a job reads it with ``settings.data.dataset =
    "upload:<id>"`` (the ``use_as`` value)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0b7f4c1e-2d3a-4e5f-8a9b-0c1d2e3f4a5b",
                    "name": "kernel-docs",
                    "format": "jsonl",
                    "text_column": "text",
                    "documents": 1532,
                    "size_bytes": 4194304,
                    "sha256": "5f1d0c2b7a4e3d6c9b8a7f6e5d4c3b2a19f8e7d6c5b4a3928170f6e5d4c3b2a1",
                    "created_at": "2026-12-05T10:00:00Z",
                    "use_as": "upload:0b7f4c1e-2d3a-4e5f-8a9b-0c1d2e3f4a5b",
                }
            ]
        }
    )

    id: str
    name: str | None
    format: Literal["txt", "jsonl", "parquet"] = Field(description="The form field it was uploaded in.")
    text_column: str | None = Field(
        description="Column read from a table ('input_ids' / 'tokens': pre-tokenized); None for txt."
    )
    documents: int = Field(description="Non-empty documents (rows) found when the upload was checked.")
    size_bytes: int = Field(description="Bytes stored (counted in your storage quota).")
    sha256: str = Field(description="SHA-256 of the uploaded file.")
    created_at: datetime
    use_as: str = Field(description="The settings.data.dataset value that reads this corpus in a job.")


class DatasetList(Page[Dataset]):
    """A page of your uploaded corpora, newest first."""

    model_config = _page_example(Dataset.model_config["json_schema_extra"]["examples"][0])  # type: ignore[index]


# -- estimates ---------------------------------------------------------------------------------------------------
ESTIMATE_EXAMPLE: dict[str, Any] = {
    "device": "cpu",
    "tokens": {"train": 131072, "eval": 8192, "finetune_rows": 614400, "calibrate": 4096, "ce": 8192},
    "disk": {"activations_bytes": 322961408, "artifacts_bytes": 11665408},
    "memory": {"host_bytes": 1826258944, "accelerator_bytes": None},
    "stages": [
        {
            "stage": "finetune",
            "seconds": 121.4,
            "work": 1.63e12,
            "unit": "MACs (steps x batch rows x d_in x d_sae x SAEs trained)",
            "basis": {
                "source": "measured",
                "device": "cpu",
                "rate": 1.34e10,
                "jobs": 3,
                "measured_at": "2026-12-05T10:04:41Z",
                "detail": "3 succeeded jobs on cpu (smollm2-135m), the latest finished 2026-12-05 10:04:41 UTC",
            },
        }
    ],
    "total_seconds": 280.5,
    "allowed_to_proceed": True,
    "limits_exceeded": [],
    "warnings": [],
}
"""An example estimate (OpenAPI examples; ``stages`` shortened to one)."""


class EstimateBasis(ApiModel):
    """Where a stage's expected seconds come from: a rate measured by this server's workers, or a default."""

    source: Literal["measured", "default", "unknown"] = Field(
        description="'measured': the rate of jobs this server's workers ran on this device; 'default': the "
        "service's documented rate, measured on its reference CPU (no job recorded here yet); 'unknown': a size "
        "this stage depends on is not known before the worker runs (e.g. a hub teacher's d_sae)."
    )
    device: str | None = Field(None, description="The device the rate was measured on ('cpu', 'cuda:<GPU name>').")
    rate: float | None = Field(None, description="Work units per second.")
    jobs: int = Field(0, description="How many recorded jobs the measured rate aggregates (0 for a default).")
    measured_at: datetime | None = Field(None, description="When the latest of those jobs (or the default) ran.")
    detail: str = Field(description="The basis in words.")


class StageEstimate(ApiModel):
    """Expected wall time of one pipeline stage."""

    stage: str
    seconds: float | None = Field(description="Expected seconds (work / rate); null when the work is unknown.")
    work: float | None = Field(description="The stage's work in 'unit'.")
    unit: str = Field(description="What one unit of work is (rsae.cost.WORK_UNITS).")
    basis: EstimateBasis


class EstimateTokens(ApiModel):
    """Token and row counts of the job."""

    train: int = Field(description="Training activation rows extracted (settings.data.train_tokens).")
    eval: int = Field(description="Held-out activation rows extracted (settings.data.eval_tokens).")
    finetune_rows: int = Field(description="Rows one fine-tuned SAE sees: finetune.steps x finetune.batch_size.")
    calibrate: int = Field(description="Training rows the calibration reads (calibrate.tokens).")
    ce: int = Field(description="Held-out tokens spliced through the full model for delta CE.")


class EstimateDisk(ApiModel):
    """Disk the job writes, bytes (null: unknown before the worker runs)."""

    activations_bytes: int | None = Field(
        description="Float32 activation shards in the job's scratch: (train + eval) x d_model x 4; the figure "
        "RSAE_MAX_JOB_DISK_BYTES bounds."
    )
    artifacts_bytes: int | None = Field(
        description="The artifacts counted against your storage quota (8 x d_in x d_sae + 1 MiB for an uploaded "
        "teacher; null for hub and server-side teachers)."
    )


class EstimateMemory(ApiModel):
    """Peak memory of the worker during the job, bytes (an estimate from the sizes, not a measurement)."""

    host_bytes: int | None = Field(description="Peak resident memory of the worker process.")
    accelerator_bytes: int | None = Field(description="Peak accelerator memory; null on a CPU worker or unknown.")


class LimitProblem(ApiModel):
    """A server limit the job would break: the problem ``POST /v1/jobs`` answers (same status, code, detail,
    field), or, for a warning, a run-time limit the job is expected to pass (status null)."""

    status: int | None = Field(description="HTTP status POST /v1/jobs answers (null: a run-time limit).")
    code: str
    detail: str
    field: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="The problem's other members (e.g. used_bytes).")


class JobEstimate(ApiModel):
    """What a job would cost on this server's workers, and whether it may be submitted now
    (``POST /v1/jobs/estimate``; nothing is created, queued or counted)."""

    model_config = ConfigDict(json_schema_extra={"examples": [ESTIMATE_EXAMPLE]})

    device: str = Field(description="The worker device the times are for: the latest one recorded, else 'cpu'.")
    tokens: EstimateTokens
    disk: EstimateDisk
    memory: EstimateMemory
    stages: list[StageEstimate] = Field(description="extract, init, calibrate, finetune, evaluate, package.")
    total_seconds: float | None = Field(description="Sum of the stages; null when any stage is unknown.")
    allowed_to_proceed: bool = Field(description="Whether POST /v1/jobs would accept this body now.")
    limits_exceeded: list[LimitProblem] = Field(description="Every limit that makes POST /v1/jobs refuse it.")
    warnings: list[LimitProblem] = Field(
        default_factory=list,
        description="Run-time limits the estimate says the job would pass (e.g. RSAE_JOB_DEADLINE_SECONDS).",
    )


# -- encoding (POST /v1/jobs/{id}/encode, POST /v1/saes/{id}/encode) --------------------------------------------
class TopLatents(ApiModel):
    """One SAE's top latents of one token: indices into ``[0, d_sae)`` and their values, largest first, exact
    zeros left out (so fewer than ``top_k`` when fewer latents fire)."""

    indices: list[int]
    values: list[float]


class EncodedToken(ApiModel):
    """One token of an encoded text."""

    context: int = Field(description="Which of the text's contexts (of at most context_size tokens) it is in.")
    position: int = Field(description="Its position in that context (0: the BOS token when prepend_bos).")
    token_id: int
    token: str = Field(description="The token decoded alone.")
    kept: bool = Field(
        description="Whether the conventions keep this position (seqpos_slice, exclude_special_tokens); the SAEs "
        "encode only kept positions, as they were trained."
    )
    latents: dict[str, TopLatents] | None = Field(description="Per SAE ('teacher', 'rsae'); null when not kept.")


class EncodedRow(ApiModel):
    """One encoded activation row."""

    latents: dict[str, TopLatents]


class EncodeResult(ApiModel):
    """Answer of an encode route: per token (or activation row) the top-k latents of each SAE, side by side."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m",
                    "hook_name": "blocks.3.hook_resid_post",
                    "top_k": 2,
                    "saes": ["rsae", "teacher"],
                    "conventions": {
                        "context_size": 128,
                        "prepend_bos": False,
                        "seqpos_slice": [1, None],
                        "exclude_special_tokens": False,
                        "sequence_separator_token": None,
                        "disable_concat_sequences": False,
                        "sources": {},
                    },
                    "texts": [
                        [
                            {
                                "context": 0,
                                "position": 0,
                                "token_id": 504,
                                "token": "The",
                                "kept": False,
                                "latents": None,
                            },
                            {
                                "context": 0,
                                "position": 1,
                                "token_id": 3304,
                                "token": " bank",
                                "kept": True,
                                "latents": {
                                    "rsae": {"indices": [811, 12], "values": [4.02, 1.37]},
                                    "teacher": {"indices": [811, 90], "values": [3.88, 1.1]},
                                },
                            },
                        ]
                    ],
                    "rows": None,
                }
            ]
        }
    )

    model: str = Field(description="The host model the text was run through.")
    hook_name: str = Field(description="The hook the SAEs read.")
    top_k: int
    saes: list[str] = Field(description="The SAEs encoded with: 'teacher' and/or 'rsae'.")
    conventions: dict[str, Any] | None = Field(
        description="The context conventions the text was fed with (SAELens metadata names); null for activations."
    )
    texts: list[list[EncodedToken]] | None = Field(
        description="Per input text, its tokens in order; null for activations."
    )
    rows: list[EncodedRow] | None = Field(description="Per activation row; null for text.")
