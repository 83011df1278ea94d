"""Service settings (pydantic-settings, environment prefix ``RSAE_``), shared by the API, worker and CLI."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(RuntimeError):
    """The deployment is misconfigured (e.g. no broker URL outside the embedded stack)."""


class Settings(BaseSettings):
    """Deployment settings. Every field reads ``RSAE_<FIELD>`` from the environment.

    Paths are made absolute at load time so that child processes started from another working directory
    see the same folders. The derived folders default to sub-folders of ``data_dir``; set them
    explicitly when the API and worker mount shared storage elsewhere.
    """

    model_config = SettingsConfigDict(env_prefix="RSAE_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root folder for the SQLite file, uploads, artifacts.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default a SQLite file '<data_dir>/rsae.db' (single machine). "
        "Postgres: 'postgresql+psycopg://user:pass@host/db'.",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker (Redis) URL. Unset: 'rsae-service up'/'demo' start their own "
        "redis-server and export this variable to their children; 'serve' and 'worker' require it.",
    )
    artifacts_dir: Path | None = Field(None, description="Job outputs. Default '<data_dir>/artifacts'.")
    uploads_dir: Path | None = Field(None, description="Uploaded teacher SAEs. Default '<data_dir>/saes'.")
    work_dir: Path | None = Field(
        None, description="Per-job scratch (activation shards). Default '<data_dir>/work'; deleted when a job ends."
    )
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="Largest accepted POST /saes body.")
    max_cfg_bytes: int = Field(1024**2, ge=1, description="Largest accepted cfg.json part of an upload.")
    max_body_bytes: int = Field(
        1024**2, ge=1024, description="Largest accepted request body other than a POST /saes upload (413 beyond)."
    )
    max_active_jobs_per_user: int = Field(
        20,
        ge=1,
        description="Unfinished (queued, running or cancelling) jobs one user may have; POST /jobs "
        "beyond it answers 429 with Retry-After.",
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a job's webhook may call: exact names or '*.suffix' globs, "
        "as JSON (RSAE_WEBHOOK_ALLOWED_HOSTS='[\"hooks.example.org\"]'). Empty: webhooks are refused.",
    )
    webhook_attempts: int = Field(5, ge=1, le=20, description="Delivery attempts of a webhook notice.")
    max_streams_per_user: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Event streams (GET /jobs/{id}/events as text/event-stream) one user may hold open in one API "
        "process; one more answers 429 with Retry-After.",
    )
    stream_max_seconds: float = Field(
        3600.0,
        gt=0,
        le=7 * 86400,
        description="Longest life of one event stream; the client reconnects with Last-Event-ID to go on.",
    )
    db_pool_size: int = Field(10, ge=1, le=1000, description="Connections the API keeps in its SQL pool (not SQLite).")
    db_max_overflow: int = Field(
        20, ge=0, le=1000, description="Connections the SQL pool may open beyond db_pool_size under load (not SQLite)."
    )
    page_size_default: int = Field(20, ge=1, description="GET /jobs page size when 'limit' is absent.")
    page_size_max: int = Field(100, ge=1, description="Largest accepted 'limit' of a list request.")
    queue_name: str = Field("gpu", min_length=1, description="Celery queue the upgrade tasks go to.")
    allow_local_paths: bool = Field(
        False,
        description="Accept server-side paths in job requests (teacher.path, a local model folder, "
        "a local dataset), and only under local_path_roots. Off by default (a client must not read the "
        "server's disk); 'rsae-service up' refuses it unless it binds to loopback and roots are given.",
    )
    local_path_roots: list[Path] = Field(
        default_factory=list,
        description="Absolute folders under which server-side paths may lie, as JSON "
        "(RSAE_LOCAL_PATH_ROOTS='[\"/srv/rsae/data\"]'). A path is accepted only if it is absolute and its "
        "resolve()d form (symlinks followed, '..' collapsed) lies under a resolve()d root. Empty: no path is.",
    )
    allowed_models: list[str] = Field(
        default_factory=lambda: ["smollm2-135m"],
        description="Host models a job may name: bundled names and hub ids 'org/name', exact or as "
        "fnmatch globs ('EleutherAI/pythia-*'), as JSON. Default: the bundled model only. Local model folders "
        "are governed by local_path_roots instead.",
    )
    max_hub_download_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="Largest hub download of one job, per repository: the model's files (configuration, "
        "tokenizer, weights in one format) and the teacher's folder, summed from the hub's metadata before "
        "any download (422 at submission, the job fails 'download_too_large' in the worker).",
    )
    max_job_disk_bytes: int = Field(
        10 * 1024**3,
        ge=1,
        description="Largest activation scratch of one job, estimated as (train_tokens + eval_tokens) x "
        "d_model x 4 bytes (float32 rows); d_model from the model's config or the teacher's d_in.",
    )
    max_train_tokens: int = Field(
        4_194_304, ge=256, description="Largest accepted settings.data.train_tokens (the core allows 2e8)."
    )
    max_eval_tokens: int = Field(
        1_048_576, ge=128, description="Largest accepted settings.data.eval_tokens (the core allows 5e7)."
    )
    hub_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Timeout of one hub metadata request (the API asks at submission; when the hub does "
        "not answer in time the job is accepted and the worker checks the size before downloading).",
    )
    enqueue_retries: int = Field(2, ge=0, le=10, description="Broker publish retries before giving up.")
    # -- durability (worker/lease.py, docs/reliability.md) ----------------------------------------------
    lease_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Time-to-live of a worker's lease on a running job; the heartbeat "
        "renews it every heartbeat_seconds. After it expires unrenewed, the reaper re-queues the job.",
    )
    heartbeat_seconds: float | None = Field(
        None, gt=0, description="Lease renewal interval. Default: lease_seconds / 4."
    )
    reaper_interval_seconds: float = Field(
        10.0, gt=0, description="How often each worker's reaper thread scans for expired leases."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Starts a job gets: a job whose lease expired "
        "after this many starts is failed (code 'max_attempts_exceeded').",
    )
    job_deadline_seconds: float = Field(
        6 * 3600.0,
        gt=0,
        description="Wall-clock limit of a job from its first start; past it the job "
        "fails with code 'deadline_exceeded' (checked between steps, like cancellation).",
    )
    republish_after_seconds: float = Field(
        900.0,
        gt=0,
        description="A job still queued this long after its last publish is published again "
        "by the reaper (covers a message lost by a broker without persistence; duplicates are no-ops).",
    )
    checkpoint_every_steps: int = Field(
        50, ge=1, description="Fine-tuning checkpoint interval (optimizer steps), in the job's work dir."
    )
    broker_visibility_timeout: float = Field(
        3600.0,
        gt=0,
        description="Redis visibility timeout: an unacknowledged message is redelivered after "
        "it. Safe whatever its value (a duplicate finds the job leased and exits).",
    )
    log_level: str = Field("INFO", description="Logging level of the CLI processes.")

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        self.artifacts_dir = (self.artifacts_dir or self.data_dir / "artifacts").expanduser().resolve()
        self.uploads_dir = (self.uploads_dir or self.data_dir / "saes").expanduser().resolve()
        self.work_dir = (self.work_dir or self.data_dir / "work").expanduser().resolve()
        roots = []
        for root in self.local_path_roots:
            if not root.is_absolute():
                raise ValueError(f"local_path_roots: {str(root)!r} is not an absolute path")
            roots.append(root.resolve())
        self.local_path_roots = roots
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'rsae.db'}"
        return self

    @property
    def is_sqlite(self) -> bool:
        """True when the database is a SQLite file (single-machine mode)."""
        return self.database_url.startswith("sqlite")

    def require_broker(self) -> str:
        """The broker URL, or a :class:`ConfigError` explaining how to get one."""
        if not self.broker_url:
            raise ConfigError(
                "RSAE_BROKER_URL is not set: point it at Redis (redis://host:6379/0), or use "
                "'rsae-service up', which starts its own redis-server"
            )
        return self.broker_url

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between two lease renewals (``heartbeat_seconds`` or a quarter of the lease)."""
        return self.heartbeat_seconds or self.lease_seconds / 4

    def ensure_dirs(self) -> None:
        """Create the data, uploads, artifacts and work folders if missing."""
        for d in (self.data_dir, self.uploads_dir, self.artifacts_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (``get_settings.cache_clear()`` re-reads)."""
    return Settings()
