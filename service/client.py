"""The service's Python client, kept importable from here: a re-export of :mod:`rsae_client` (the thin typed
client, which imports neither torch nor the server's packages). New code imports ``rsae_client`` directly.
"""

from __future__ import annotations

from rsae_client import (
    ApiError,
    AsyncRSAEClient,
    RetryPolicy,
    RSAEClient,
    download_artifacts,
    get_job,
    stream_events,
    submit_job,
    upload_sae,
    wait_for_job,
)
from rsae_client.models import TERMINAL_STATUSES as TERMINAL

__all__ = [
    "TERMINAL",
    "ApiError",
    "AsyncRSAEClient",
    "RSAEClient",
    "RetryPolicy",
    "download_artifacts",
    "get_job",
    "stream_events",
    "submit_job",
    "upload_sae",
    "wait_for_job",
]
