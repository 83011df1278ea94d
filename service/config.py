"""Service settings (pydantic-settings, environment prefix ``RSAE_``), shared by the API, worker and CLI."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from limits import parse_many
from pydantic import Field, IPvAnyNetwork, field_validator, model_validator
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
    datasets_dir: Path | None = Field(
        None, description="Uploaded text corpora (POST /datasets). Default '<data_dir>/datasets'."
    )
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="Largest accepted POST /saes body.")
    max_dataset_upload_bytes: int = Field(
        256 * 1024**2,
        ge=1,
        description="Largest accepted POST /datasets body (413 beyond, naming the file field). A .parquet upload "
        "whose column chunks declare more than 8 times this once decompressed is refused with 413 before it is "
        "read.",
    )
    max_cfg_bytes: int = Field(1024**2, ge=1, description="Largest accepted cfg.json part of an upload.")
    max_teacher_expanded_bytes: int | None = Field(
        None,
        ge=1,
        description="Largest teacher weights file once read, as its headers declare it (zip members' uncompressed "
        "sizes, .npy and safetensors shapes, counted as float32), checked before any member is read: a compressed "
        "params.npz or ae.pt that would expand past it is refused with 413. Default: max_upload_bytes (a compressed "
        "upload may not hold more than an uncompressed one could).",
    )
    teacher_import_memory_bytes: int | None = Field(
        None,
        ge=64 * 1024**2,
        description="Address space (RLIMIT_AS) the child process that reads and checks an uploaded teacher may add "
        "to what it starts with; past it the import stops with 413. Default: 4 x the expanded limit + 1 GiB "
        "(reading holds the file's arrays, their float32 copies and the SAE).",
    )
    teacher_import_seconds: float = Field(
        600.0, gt=0, description="Longest time the child process that reads and checks an uploaded teacher may run."
    )
    max_body_bytes: int = Field(
        1024**2, ge=1024, description="Largest accepted request body other than a POST /saes upload (413 beyond)."
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=4096,
        le=1024**2,
        description="Largest request line plus headers uvicorn buffers (h11_max_incomplete_event_size); a larger "
        "head is answered 400 and the connection closed.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Time a client has to send a request's complete head, from connecting (or from the first byte "
        "of a further request on a kept-alive connection); then the connection is closed (slow-header clients).",
    )
    keep_alive_seconds: int = Field(
        5, ge=1, le=300, description="Idle time after a response before uvicorn closes a kept-alive connection."
    )
    max_concurrency: int = Field(
        1000,
        ge=1,
        description="Most connections plus tasks one API process serves at once (uvicorn limit_concurrency); "
        "beyond it new requests get 503.",
    )
    max_active_jobs_per_user: int = Field(
        20,
        ge=1,
        description="Unfinished (queued, running or cancelling) jobs one user may have; POST /jobs "
        "beyond it answers 429 with Retry-After.",
    )
    idempotency_key_ttl_seconds: float = Field(
        86400.0,
        gt=0,
        le=90 * 86400,
        description="How long an Idempotency-Key of POST /jobs is remembered (its response replayed); after "
        "that the key is free again and the worker's reaper deletes its row.",
    )
    rate_limit_auth_failures: str = Field(
        "30/minute",
        description="Failed authentications allowed per client address and per presented token, in the "
        "'limits' notation ('30/minute', '5/second;100/hour'); beyond it every request from that address "
        "or with that token answers 429 with Retry-After until the window frees. Empty: no limit.",
    )
    rate_limit_submissions_per_token: str = Field(
        "30/minute",
        description="POST /jobs and POST /saes requests allowed per API token ('limits' notation); beyond it "
        "429 with Retry-After. Empty: no limit.",
    )
    rate_limit_submissions_per_address: str = Field(
        "120/minute",
        description="POST /jobs and POST /saes requests allowed per client address (IPv6: per /64), all "
        "tokens together ('limits' notation); beyond it 429 with Retry-After. Empty: no limit.",
    )
    auth_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long one API process remembers a valid token (keyed by its SHA-256) instead of looking it "
        "up again: a revoked token (or its deleted user) keeps working for at most this long in a process that "
        "has just seen it. Also how long it skips the auth-failure limit's check for an address that has just "
        "presented that valid token (failures counted by another process block it within this bound; by the "
        "same process, at once). 0: every request looks its token up and checks the limit.",
    )
    auth_cache_size: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Most tokens one API process remembers at once (least recently used are dropped first).",
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a job's webhook may call: exact names or '*.suffix' globs, "
        "as JSON (RSAE_WEBHOOK_ALLOWED_HOSTS='[\"hooks.example.org\"]'). Empty: webhooks are refused.",
    )
    webhook_allowed_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [80, 443],
        description="TCP ports a job's webhook URL may use (explicit, else 80 for http and 443 for https), "
        "as JSON (RSAE_WEBHOOK_ALLOWED_PORTS='[443, 8443]').",
    )
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Networks a webhook may reach although not public (loopback, private, link-local, ...: "
        "refused otherwise, whatever the host name), as JSON (RSAE_WEBHOOK_ALLOWED_NETWORKS='[\"10.1.2.0/24\"]'). "
        "Empty by default.",
    )
    webhook_retry_seconds: float = Field(
        86400.0,
        gt=0,
        le=30 * 86400,
        description="How long after a job finished its webhook notice is retried (exponential backoff) "
        "before it is given up ('failed after N attempts').",
    )
    webhook_backoff_seconds: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Wait after the first failed webhook attempt; doubles after each further failure, "
        "at most 1 h. Retries run on the reapers' passes (every reaper_interval_seconds).",
    )
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
    # -- storage bounds (service/storage.py) -------------------------------------------------------------
    max_storage_bytes_per_user: int = Field(
        50 * 1024**3,
        ge=1,
        description="Bytes one user may keep stored: their uploaded teachers plus their jobs' artifacts plus an "
        "estimate of the artifacts of their unfinished jobs. An upload or a job submission beyond it answers "
        "413 storage_quota_exceeded with the figures; DELETE /saes/{id} and DELETE /jobs/{id} free space.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Days a succeeded job's artifacts are kept after it finished; the reaper then deletes the "
        "files and their rows and marks the job expired_at (the job row, events and metrics stay; a download "
        "answers 410 Gone). Unset: kept until the job is deleted.",
    )
    db_pool_size: int = Field(10, ge=1, le=1000, description="Connections the API keeps in its SQL pool (not SQLite).")
    db_max_overflow: int = Field(
        20, ge=0, le=1000, description="Connections the SQL pool may open beyond db_pool_size under load (not SQLite)."
    )
    db_connect_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Postgres connect timeout of every connection (libpq connect_timeout, >= 2 s)."
    )
    db_statement_timeout_seconds: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="Postgres statement_timeout of every connection (0: none); a statement running longer fails "
        "with a transient error and is retried. Migrations run without it.",
    )
    db_keepalives_idle_seconds: int = Field(
        30, ge=1, le=7200, description="Idle time before the first TCP keepalive probe of a Postgres connection."
    )
    db_keepalives_interval_seconds: int = Field(10, ge=1, le=600, description="Time between TCP keepalive probes.")
    db_keepalives_count: int = Field(
        3,
        ge=1,
        le=100,
        description="Unanswered keepalive probes before a Postgres connection is dead; idle + interval * count "
        "is also its tcp_user_timeout, so no query waits longer on a dead socket.",
    )
    db_busy_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="SQLite busy timeout: how long a writer waits for the database lock."
    )
    page_size_default: int = Field(20, ge=1, description="GET /jobs page size when 'limit' is absent.")
    page_size_max: int = Field(100, ge=1, description="Largest accepted 'limit' of a list request.")
    queue_name: str = Field("gpu", min_length=1, description="Celery queue the upgrade tasks go to.")
    # -- encoding for tools (POST /v1/jobs/{id}/encode, POST /v1/saes/{id}/encode; worker/encode.py) -------------
    encode_queue_name: str = Field(
        "encode",
        min_length=1,
        description="Celery queue the encode requests go to (served by 'rsae-service encode-worker').",
    )
    encode_start_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="How long an encode request waits for an encode worker to take it; then 503 encode_unavailable "
        "with Retry-After (no encode worker is consuming the queue, or all are busy), and the queued message expires "
        "unrun.",
    )
    encode_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="How long an encode request waits for its result once a worker took it; then 504 encode_timeout. "
        "Also the soft time limit of the encode task in the worker.",
    )
    encode_max_tokens: int = Field(
        1024,
        ge=1,
        le=65536,
        description="Most tokens one encode request may feed the host model (all texts, BOS tokens included); "
        "beyond it 413 naming 'text'.",
    )
    encode_max_texts: int = Field(
        32, ge=1, le=10_000, description="Most texts in one encode request (413 naming 'text')."
    )
    encode_max_rows: int = Field(
        256, ge=1, le=65536, description="Most activation rows in one encode request (413 naming 'activations')."
    )
    encode_max_top_k: int = Field(64, ge=1, le=4096, description="Largest accepted top_k of an encode request (422).")
    encode_cache_models: int = Field(
        2, ge=1, le=64, description="Host models an encode worker keeps loaded (least recently used dropped first)."
    )
    encode_cache_saes: int = Field(
        16, ge=1, le=10_000, description="SAEs an encode worker keeps loaded (least recently used dropped first)."
    )
    encode_cache_sae_bytes: int = Field(
        4 * 1024**3,
        ge=1024**2,
        description="Bytes of SAE tensors an encode worker keeps loaded, all SAEs together (least recently used "
        "dropped first; one SAE larger than this is loaded for its request only).",
    )
    rate_limit_encode_per_user: str = Field(
        "120/minute",
        description="Encode requests (POST .../encode) allowed per user ('limits' notation); beyond it 429 with "
        "Retry-After. Empty: no limit.",
    )
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
    task_time_limit_grace_seconds: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Celery time limits of one task run: soft = job_deadline_seconds + this (the task ends the "
        "job deadline_exceeded), hard = job_deadline_seconds + 2 x this (the pool process is killed; the "
        "reaper takes over). The job deadline itself is checked between steps before either.",
    )
    worker_max_tasks_per_child: int | None = Field(
        20,
        ge=1,
        description="A Celery pool process is replaced after this many tasks (frees memory torch or a host "
        "model kept); None: never.",
    )
    worker_max_memory_per_child_mb: int | None = Field(
        8192,
        ge=64,
        description="A Celery pool process whose resident memory exceeds this (MiB) is replaced after its "
        "current task (Celery worker_max_memory_per_child); None: no limit.",
    )
    log_level: str = Field("INFO", description="Logging level of the CLI processes.")

    @field_validator(
        "rate_limit_auth_failures",
        "rate_limit_submissions_per_token",
        "rate_limit_submissions_per_address",
        "rate_limit_encode_per_user",
    )
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        """A rate in the ``limits`` notation (e.g. ``30/minute``, ``5/second;100/hour``) or empty (no limit)."""
        value = value.strip()
        if value:
            try:
                parse_many(value)
            except ValueError as e:
                raise ValueError(f"not a rate in the 'limits' notation (e.g. '30/minute'): {e}") from None
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        self.artifacts_dir = (self.artifacts_dir or self.data_dir / "artifacts").expanduser().resolve()
        self.uploads_dir = (self.uploads_dir or self.data_dir / "saes").expanduser().resolve()
        self.work_dir = (self.work_dir or self.data_dir / "work").expanduser().resolve()
        self.datasets_dir = (self.datasets_dir or self.data_dir / "datasets").expanduser().resolve()
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
    def teacher_expanded_limit(self) -> int:
        """``max_teacher_expanded_bytes``, or ``max_upload_bytes`` when unset."""
        return self.max_teacher_expanded_bytes or self.max_upload_bytes

    @property
    def teacher_import_memory_limit(self) -> int:
        """``teacher_import_memory_bytes``, or 4 x :attr:`teacher_expanded_limit` + 1 GiB when unset."""
        return self.teacher_import_memory_bytes or 4 * self.teacher_expanded_limit + 1024**3

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between two lease renewals (``heartbeat_seconds`` or a quarter of the lease)."""
        return self.heartbeat_seconds or self.lease_seconds / 4

    def ensure_dirs(self) -> None:
        """Create the data, uploads, artifacts, work and datasets folders if missing."""
        for d in (self.data_dir, self.uploads_dir, self.artifacts_dir, self.work_dir, self.datasets_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (``get_settings.cache_clear()`` re-reads)."""
    return Settings()


def settings_markdown() -> str:
    """Every setting as a Markdown table (environment variable, default, description), in field order: the
    body of ``docs/settings.md`` (regenerate with ``python -m service.config > docs/settings.md``; a test
    checks the checked-in file equals this)."""
    rows = [
        "# Settings",
        "",
        "Generated from `service/config.py` by `python -m service.config > docs/settings.md`; every variable is",
        "read by the API, the worker and the CLI (pydantic-settings, prefix `RSAE_`). Lists and sets are JSON.",
        "",
        "| variable | default | what it sets |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        shown = "unset" if default is None else f"`{default}`"
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `RSAE_{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
