"""Job bounds and server-side paths (issue 11): what one job may read from the server's disk, fetch from the
hub and write to scratch. Checked by the API at submission (:func:`check_request_bounds`, 422 naming the field
with the figure) and again by the worker before it downloads or extracts anything (:func:`worker_preflight`),
since settings may change and the hub may not answer at submission.

Server-side paths. A model spec is a bundled name, a hub id ``org/name``, or else a path
(:func:`rsae.models.model_spec_kind`); a dataset is ``bbc-news`` or else a path; ``teacher.path`` is always a
path. A path is accepted only when ``allow_local_paths`` is on, it is absolute (never resolved against a
process's working directory), and its ``Path.resolve()``d form (symlinks followed, ``..`` collapsed) lies under
one of ``local_path_roots`` (themselves resolved). The worker runs with the resolved paths.

Bounds. ``allowed_models`` (bundled names and hub ids, fnmatch globs); ``max_train_tokens`` /
``max_eval_tokens``; ``max_job_disk_bytes`` against ``(training rows on disk + eval_tokens) x d_model x 4`` bytes,
the float32 activation shards the extract stage writes (all ``train_tokens`` rows, or with streamed training
activations only ``stream_disk_tokens`` of them: :func:`rsae.stream.train_disk_rows`; d_model from the model's
``config.json`` or the teacher's ``d_in``, which must equal it); ``max_hub_download_bytes`` against the sizes the
hub's metadata gives for the model's files and the teacher's folder (:func:`rsae.hub.repo_files`; nothing is
downloaded to check). When the hub cannot be asked at submission (offline mode, unreachable, timeout) the job is
accepted and the worker asks again before downloading; if it still cannot, it downloads nothing itself and the
model loads from the local cache or fails with ``invalid_model``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from rsae.data import dataset_spec_kind
from rsae.errors import DataError
from rsae.hub import HubFile, check_hub_ref, folder_files, model_files, repo_files
from rsae.models import model_shape, model_spec_kind
from rsae.stream import train_disk_rows

from .config import Settings
from .models import Sae, is_uuid
from .problems import ProblemError
from .schemas import JobCreate

log = logging.getLogger(__name__)

GiB = 1024**3


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB ({n:,} bytes)"


# -- server-side paths -----------------------------------------------------------------------------
def path_specs(req: JobCreate) -> dict[str, str]:
    """The inputs of ``req`` that name server-side paths, by field (``teacher.path``, ``model``,
    ``settings.data.dataset``): anything that is not a bundled name, a hub id or (a dataset) ``upload:<id>`` is
    a path (:func:`rsae.models.model_spec_kind`, :func:`rsae.data.dataset_spec_kind`).

    Raises:
        rsae.errors.ModelError: the model is a URL (422 ``invalid_model``).
        ProblemError: 422 ``invalid_dataset`` naming ``settings.data.dataset``: it is empty or a URL.
    """
    out: dict[str, str] = {}
    if req.teacher.path is not None:
        out["teacher.path"] = req.teacher.path
    if req.model.strip() and model_spec_kind(req.model) == "path":  # empty: the core's validation names it
        out["model"] = req.model.strip()
    try:
        dataset_kind = dataset_spec_kind(req.settings.data.dataset)
    except DataError as e:  # empty or a URL
        raise ProblemError(422, e.code, e.message, field="settings.data.dataset") from None
    if dataset_kind == "path":
        out["settings.data.dataset"] = req.settings.data.dataset
    return out


def resolve_local_path(field: str, spec: str, settings: Settings) -> Path:
    """The real location of server-side path ``spec`` (input ``field``) if this server accepts it.

    Raises:
        ProblemError: 422 ``local_paths_disabled`` (``allow_local_paths`` off or no ``local_path_roots``);
            422 ``path_not_allowed`` (relative, or resolving outside every root, e.g. through ``..`` or a
            symlink); each naming ``field``.
    """
    if not settings.allow_local_paths or not settings.local_path_roots:
        why = "RSAE_ALLOW_LOCAL_PATHS=false" if not settings.allow_local_paths else "RSAE_LOCAL_PATH_ROOTS is empty"
        raise ProblemError(
            422,
            "local_paths_disabled",
            f"{field}: {spec[:200]!r} is a server-side path, and server-side paths are disabled on this server "
            f"({why}); use a bundled name or a hub id, and upload teachers with POST /saes",
            field=field,
        )
    if "\x00" in spec or not os.path.isabs(spec):
        raise ProblemError(
            422,
            "path_not_allowed",
            f"{field}: {spec[:200]!r} is a relative path; server-side paths must be absolute (they are never "
            "resolved against the server's working directory)",
            field=field,
        )
    real = Path(spec).resolve()
    if not any(real.is_relative_to(root) for root in settings.local_path_roots):
        roots = ", ".join(str(r) for r in settings.local_path_roots)
        raise ProblemError(
            422,
            "path_not_allowed",
            f"{field}: {spec[:200]!r} resolves to {str(real)[:200]!r}, which is not under an allowed root "
            f"(RSAE_LOCAL_PATH_ROOTS: {roots})",
            field=field,
        )
    return real


def check_local_paths(req: JobCreate, settings: Settings) -> dict[str, Path]:
    """Check every server-side path of ``req`` (:func:`path_specs`, :func:`resolve_local_path`) and that it
    exists as the right kind of thing.

    Returns:
        The resolved path of each path input, by field.

    Raises:
        ProblemError: 422 as :func:`resolve_local_path`; 422 ``invalid_teacher`` / ``invalid_model`` /
            ``invalid_dataset`` when the path is not an existing folder (teacher, model) or file or folder
            (dataset).
        rsae.errors.ModelError: the model is a URL.
    """
    resolved = {field: resolve_local_path(field, spec, settings) for field, spec in path_specs(req).items()}
    for field, real in resolved.items():
        ok = real.is_dir() if field != "settings.data.dataset" else (real.is_dir() or real.is_file())
        if not ok:
            code = {"teacher.path": "invalid_teacher", "model": "invalid_model"}.get(field, "invalid_dataset")
            kind = "an existing folder" if field != "settings.data.dataset" else "an existing file or folder"
            raise ProblemError(422, code, f"{field}: {str(real)[:200]!r} is not {kind}", field=field)
    return resolved


def use_resolved_paths(req: JobCreate, resolved: dict[str, Path]) -> None:
    """Replace, in place, the path inputs of ``req`` by their resolved forms (what the worker runs with)."""
    if "teacher.path" in resolved:
        req.teacher.path = str(resolved["teacher.path"])
    if "model" in resolved:
        req.model = str(resolved["model"])
    if "settings.data.dataset" in resolved:
        req.settings.data.dataset = str(resolved["settings.data.dataset"])


# -- bounds that need no I/O -----------------------------------------------------------------------
def check_model_allowed(req: JobCreate, settings: Settings) -> None:
    """A bundled or hub model must match ``allowed_models`` (exact or fnmatch glob; local folders are
    governed by the path roots).

    Raises:
        ProblemError: 422 ``model_not_allowed`` naming ``model``.
    """
    check_model_name(req.model, settings)


def check_model_name(model: str, settings: Settings) -> None:
    """:func:`check_model_allowed` for a model spec alone (also the encode route's ``model``)."""
    if model_spec_kind(model) == "path":
        return
    if not any(fnmatch.fnmatchcase(model, pattern) for pattern in settings.allowed_models):
        raise ProblemError(
            422,
            "model_not_allowed",
            f"model {model[:200]!r} is not allowed on this server (RSAE_ALLOWED_MODELS: "
            f"{', '.join(settings.allowed_models) or 'none'})",
            field="model",
        )


def check_token_budgets(req: JobCreate, settings: Settings) -> None:
    """``settings.data.train_tokens`` and ``eval_tokens`` within ``max_train_tokens`` / ``max_eval_tokens``.

    Raises:
        ProblemError: 422 ``token_budget_exceeded`` naming the field, with the figure and the limit.
    """
    data = req.settings.data
    for name, value, limit, env in (
        ("train_tokens", data.train_tokens, settings.max_train_tokens, "RSAE_MAX_TRAIN_TOKENS"),
        ("eval_tokens", data.eval_tokens, settings.max_eval_tokens, "RSAE_MAX_EVAL_TOKENS"),
    ):
        if value > limit:
            raise ProblemError(
                422,
                "token_budget_exceeded",
                f"settings.data.{name} is {value:,}; this server accepts at most {limit:,} ({env})",
                field=f"settings.data.{name}",
            )


def scratch_bytes(req: JobCreate, d_model: int) -> int:
    """Bytes of activation shards a job writes: (training rows on disk + eval_tokens) x d_model x 4 (float32); the
    training rows on disk are all ``train_tokens``, or the head of a streamed split
    (:func:`rsae.stream.train_disk_rows`, ``settings.data.activation_storage`` resolved with ``d_model``)."""
    s = req.settings
    return (train_disk_rows(s.data, s.calibrate.tokens, d_model) + s.data.eval_tokens) * d_model * 4


def check_disk_budget(req: JobCreate, settings: Settings, d_model: int | None, source: str = "") -> None:
    """The job's activation scratch (:func:`scratch_bytes`) within ``max_job_disk_bytes``; no check when
    ``d_model`` is unknown (None).

    Raises:
        ProblemError: 422 ``disk_budget_exceeded`` naming ``settings.data.train_tokens``, with the figure.
    """
    if d_model is None:
        return
    need = scratch_bytes(req, d_model)
    if need > settings.max_job_disk_bytes:
        data = req.settings.data
        raise ProblemError(
            422,
            "disk_budget_exceeded",
            f"the job would write {_gib(need)} of activations ((train_tokens {data.train_tokens:,} + eval_tokens "
            f"{data.eval_tokens:,}) x d_model {d_model}{source} x 4 bytes); this server allows "
            f"{_gib(settings.max_job_disk_bytes)} per job (RSAE_MAX_JOB_DISK_BYTES): lower settings.data.train_tokens, "
            "or stream them (settings.data.activation_storage: stream)",
            field="settings.data.train_tokens",
        )


def teacher_width(session: Session | None, req: JobCreate, teacher_path: str | None = None) -> int | None:
    """The teacher's ``d_in`` when known without network: an uploaded SAE's row, else ``cfg.json`` of the
    teacher folder (``teacher_path`` or ``teacher.path``); None otherwise (a hub teacher at submission)."""
    if req.teacher.sae_id is not None and session is not None and is_uuid(req.teacher.sae_id):
        sae = session.get(Sae, req.teacher.sae_id)
        if sae is not None:
            return sae.d_in
    folder = teacher_path or req.teacher.path
    if folder:
        try:
            d_in = json.loads((Path(folder) / "cfg.json").read_text()).get("d_in")
            return int(d_in) if isinstance(d_in, int) and d_in > 0 else None
        except (OSError, ValueError, AttributeError):
            return None
    return None


def job_width(session: Session | None, req: JobCreate, teacher_path: str | None = None) -> tuple[int | None, str]:
    """``(d_model, where it came from)`` for the disk budget: the model's shape when known here
    (:func:`rsae.models.model_shape`), else the teacher's ``d_in`` (:func:`teacher_width`), else None."""
    shape = model_shape(req.model)
    if shape is not None:
        return shape[1], ""
    d_in = teacher_width(session, req, teacher_path)
    return d_in, (" (the teacher's d_in)" if d_in is not None else "")


# -- hub downloads ---------------------------------------------------------------------------------
@dataclass
class HubPlan:
    """What a job fetches from the hub, as the hub's metadata lists it (None: not from the hub, or unknown)."""

    model: list[HubFile] | None = None
    teacher: list[HubFile] | None = None
    """All files of the teacher's repository (the folder is picked by :func:`rsae.hub.resolve_hub_teacher`)."""


def _too_large(field: str, what: str, files: list[HubFile], settings: Settings) -> None:
    total = sum(f.size for f in files)
    if total > settings.max_hub_download_bytes:
        raise ProblemError(
            422,
            "download_too_large",
            f"{what} is {_gib(total)} in {len(files)} files on the hub; this server downloads at most "
            f"{_gib(settings.max_hub_download_bytes)} per repository (RSAE_MAX_HUB_DOWNLOAD_BYTES)",
            field=field,
        )


def check_hub_sizes(req: JobCreate, settings: Settings) -> HubPlan:
    """Ask the hub for the sizes of what the job would download (the model's files, the teacher's folder)
    and check them against ``max_hub_download_bytes``. Nothing is downloaded.

    Returns:
        The files to fetch; a part is None when it does not come from the hub or the hub did not answer
        (logged; offline mode, unreachable, ``hub_timeout_seconds`` passed).

    Raises:
        ProblemError: 422 ``download_too_large`` naming ``model`` or ``teacher.hub``; 422 ``invalid_model`` /
            ``invalid_teacher`` when the hub says the repository or revision does not exist.
    """
    plan = HubPlan()
    if model_spec_kind(req.model) == "hub":
        try:
            files = repo_files(req.model, timeout=settings.hub_timeout_seconds)
        except LookupError as e:
            raise ProblemError(422, "invalid_model", f"model: {e}", field="model") from None
        if files is None:
            log.warning("hub metadata of model %s unavailable: size not checked now", req.model)
        else:
            plan.model = model_files(files)
            _too_large("model", f"model {req.model}", plan.model, settings)
    if req.teacher.hub is not None:
        hub = req.teacher.hub
        repo_id, subfolder, _ = check_hub_ref(**hub.model_dump())
        try:
            files = repo_files(repo_id, hub.revision, timeout=settings.hub_timeout_seconds)
        except LookupError as e:
            raise ProblemError(422, "invalid_teacher", f"teacher.hub: {e}", field="teacher.hub") from None
        if files is None:
            log.warning("hub metadata of teacher %s unavailable: size not checked now", repo_id)
        else:
            wanted = folder_files(files, subfolder)
            if not wanted:
                raise ProblemError(
                    422,
                    "invalid_teacher",
                    f"teacher.hub: {repo_id} has no files under {subfolder!r}",
                    field="teacher.hub",
                )
            where = f"{repo_id}/{subfolder}" if subfolder else f"the whole repository {repo_id}"
            _too_large("teacher.hub", f"teacher {where}", wanted, settings)
            plan.teacher = files
    return plan


# -- entry points ----------------------------------------------------------------------------------
LIMIT_CODES: frozenset[str] = frozenset(
    {"model_not_allowed", "token_budget_exceeded", "disk_budget_exceeded", "download_too_large"}
)
"""Codes of this module's refusals that are the server's limits (rather than a malformed request): what
``POST /v1/jobs/estimate`` lists under ``limits_exceeded`` instead of answering 422."""


def _bound_checks(session: Session, settings: Settings, req: JobCreate) -> list[tuple[str, Callable[[], object]]]:
    """The checks of :func:`check_request_bounds`, cheapest first: ``(name, call)``; each call raises
    ProblemError."""
    d_model, source = job_width(session, req)
    return [
        ("model", lambda: check_model_allowed(req, settings)),
        ("tokens", lambda: check_token_budgets(req, settings)),
        ("disk", lambda: check_disk_budget(req, settings, d_model, source)),
        ("hub", lambda: check_hub_sizes(req, settings)),
    ]


def check_request_bounds(session: Session, settings: Settings, req: JobCreate) -> None:
    """The API's admission checks of this module, cheapest first: allowed model, token budgets, disk
    budget (when d_model is known without network), then the hub sizes (one metadata request per repository,
    at most ``hub_timeout_seconds`` each). Paths are checked earlier (:func:`check_local_paths`).

    Raises:
        ProblemError: 422 naming the field, as the checks above.
    """
    for _name, check in _bound_checks(session, settings, req):
        check()


def request_bound_problems(session: Session, settings: Settings, req: JobCreate) -> list[ProblemError]:
    """Every limit of :func:`check_request_bounds` that ``req`` breaks (codes in :data:`LIMIT_CODES`), in the
    same order and with the same problems ``POST /v1/jobs`` answers with the first of them; nothing is raised
    for them (``POST /v1/jobs/estimate``). The hub is not asked about a model this server does not allow.

    Raises:
        ProblemError: a refusal that is not a limit (e.g. 422 ``invalid_model`` when the hub says the model does
            not exist), exactly as :func:`check_request_bounds` raises it.
    """
    out: list[ProblemError] = []
    for name, check in _bound_checks(session, settings, req):
        if name == "hub" and any(p.code == "model_not_allowed" for p in out):
            continue
        try:
            check()
        except ProblemError as e:
            if e.code not in LIMIT_CODES:
                raise
            out.append(e)
    return out


def worker_preflight(req: JobCreate, settings: Settings) -> HubPlan:
    """The worker's checks before it fetches anything, with the settings it runs under: paths (``req`` is
    rewritten to the resolved paths), allowed model, token budgets, hub sizes.

    Raises:
        ProblemError: as :func:`check_local_paths`, :func:`check_request_bounds` (the job fails with its code
            and field).
    """
    use_resolved_paths(req, check_local_paths(req, settings))
    check_model_allowed(req, settings)
    check_token_budgets(req, settings)
    return check_hub_sizes(req, settings)


def fetch_model(req: JobCreate, plan: HubPlan, should_cancel: Callable[[], bool]) -> None:
    """Download the model's files listed in ``plan`` into the hub cache one by one, asking ``should_cancel``
    between files (``from_pretrained`` then finds them there); nothing when the plan has none.

    Raises:
        rsae.errors.Cancelled: cancel, deadline or lease loss between two files.
        rsae.errors.ModelError: a download failed (field ``model``).
    """
    if not plan.model:
        return
    from rsae.errors import ModelError, RSAEError
    from rsae.hub import download_files

    try:
        download_files(req.model, plan.model, should_cancel=should_cancel)
    except RSAEError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub or network failure: the job fails naming the model
        raise ModelError(f"could not download {req.model}: {type(e).__name__}: {e}", field="model") from None
