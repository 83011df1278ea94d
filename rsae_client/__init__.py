"""Thin typed client of the RSAE upgrade service: pure Python (httpx, httpx-sse, pydantic), no torch or numpy.

Install alone with ``pip install "rsae-service[client]"`` deps (see ``pyproject.toml``); import as
``from rsae_client import RSAEClient, AsyncRSAEClient``. The response models (:mod:`rsae_client.models`)
are the server's own, so the fields are the API's.
"""

from __future__ import annotations

from ._core import ApiError, RetryPolicy, retry_after_seconds
from .aio import AsyncRSAEClient
from .client import (
    RSAEClient,
    download_artifacts,
    get_job,
    stream_events,
    submit_job,
    upload_sae,
    wait_for_job,
)
from .formats import TEACHER_FORMATS, teacher_files
from .models import (
    API_PREFIX,
    DATASET_FORMATS,
    JOB_STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    Checkpoint,
    Dataset,
    EncodedRow,
    EncodedToken,
    EncodeResult,
    Event,
    HubRef,
    Job,
    JobError,
    JobEstimate,
    Page,
    Sae,
    TeacherRef,
    TopLatents,
)

__version__ = "0.1.0"
"""The client's version (the ``rsae-service`` distribution's)."""

__all__ = [
    "API_PREFIX",
    "DATASET_FORMATS",
    "JOB_STATUSES",
    "TEACHER_FORMATS",
    "TERMINAL_STATUSES",
    "ApiError",
    "Artifact",
    "AsyncRSAEClient",
    "Checkpoint",
    "Dataset",
    "EncodeResult",
    "EncodedRow",
    "EncodedToken",
    "Event",
    "HubRef",
    "Job",
    "JobError",
    "JobEstimate",
    "Page",
    "RSAEClient",
    "RetryPolicy",
    "Sae",
    "TeacherRef",
    "TopLatents",
    "download_artifacts",
    "get_job",
    "retry_after_seconds",
    "stream_events",
    "submit_job",
    "teacher_files",
    "upload_sae",
    "wait_for_job",
]
