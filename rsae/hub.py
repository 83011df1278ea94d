"""Teacher SAEs named by a hub reference, resolved to a local folder with the real ``huggingface_hub`` client.

Two kinds of reference:

- a SAELens release and SAE id (``release="gemma-scope-2b-pt-res", sae_id="layer_12/width_16k/average_l0_82"``):
  looked up in the ``pretrained_saes.yaml`` directory shipped inside the installed ``sae-lens`` package
  (repo id + folder), read without importing ``sae_lens`` (whose import takes ~12 s);
- a hub repo id ``org/name`` with an optional ``subfolder`` and ``revision``.

The folder is fetched with ``huggingface_hub.snapshot_download`` restricted to ``<subfolder>/*``. Offline mode
(``HF_HUB_OFFLINE=1``, read at call time) passes ``local_files_only=True`` so only the local cache is used;
the cache is ``cache_dir``, else ``$HF_HUB_CACHE``, else the hub client's default. Only repo ids matching
:data:`REPO_ID` are accepted: never a URL. The resolved folder is then read by :func:`rsae.formats.load_teacher`
(any of its four formats).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TeacherError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
"""Accepted hub repo ids: ``org/name`` (the hub's own rules: letters, digits, ``._-``, at most 96 each). The one
definition, also used for model hub ids by :func:`rsae.models.resolve_model`."""
_SUBFOLDER = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
_RELEASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


@dataclass(frozen=True)
class HubTeacher:
    """A resolved hub reference: the local ``path`` to load, and where it came from."""

    path: Path
    repo_id: str
    subfolder: str | None
    revision: str | None
    release: str | None = None
    sae_id: str | None = None
    conversion_func: str | None = None
    norm_scaling_factor: float | None = None
    """The release's ``norm_scaling_factor`` for this SAE (``pretrained_saes.yaml``): the weights expect inputs
    scaled by it, and ``SAE.from_pretrained`` folds it (:func:`rsae.formats.import_teacher` does too)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (path as str)."""
        return {
            "path": str(self.path),
            "repo_id": self.repo_id,
            "subfolder": self.subfolder,
            "revision": self.revision,
            "release": self.release,
            "sae_id": self.sae_id,
            "conversion_func": self.conversion_func,
            "norm_scaling_factor": self.norm_scaling_factor,
        }


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to 1/true/yes/on, read now."""
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().lower() in {"1", "true", "yes", "on"}


def _check_subfolder(sub: str | None, field: str) -> str | None:
    if sub is None or sub in ("", "."):
        return None
    sub = sub.strip("/")
    if not _SUBFOLDER.match(sub) or ".." in sub.split("/"):
        raise TeacherError(f"subfolder {sub!r} must be a relative path of plain names", field=field)
    return sub


@functools.lru_cache(maxsize=1)
def saelens_directory() -> dict[str, dict[str, Any]]:
    """SAELens's pretrained SAE directory: release -> ``{"repo_id", "model", "conversion_func", "saes": {id:
    path}, "norm_scaling_factor": {id: float}}``, parsed from ``sae_lens/pretrained_saes.yaml`` of the installed
    ``sae-lens`` (without importing it).

    Raises:
        TeacherError: ``sae-lens`` is not installed (field ``teacher.release``).
    """
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "SAELens release names need the 'sae-lens' package (pip install sae-lens)", field="teacher.release"
        )
    import yaml

    f = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    with open(f, encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    out: dict[str, dict[str, Any]] = {}
    for release, v in data.items():
        saes = {str(s["id"]): str(s["path"]) for s in v.get("saes", [])}
        norms = {str(s["id"]): float(s["norm_scaling_factor"]) for s in v.get("saes", []) if "norm_scaling_factor" in s}
        out[release] = {
            "repo_id": v["repo_id"],
            "model": v.get("model"),
            "conversion_func": v.get("conversion_func"),
            "saes": saes,
            "norm_scaling_factor": norms,
        }
    return out


def check_hub_ref(
    *,
    repo_id: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    release: str | None = None,
    sae_id: str | None = None,
) -> tuple[str, str | None, str | None]:
    """Validate a hub reference without any network access (what a service checks at submission).

    Returns:
        ``(repo_id, subfolder, conversion_func)``: a SAELens release is looked up in the bundled directory.

    Raises:
        TeacherError: as :func:`resolve_hub_teacher` for malformed or unknown ids.
    """
    conversion = None
    if release is not None:
        if repo_id is not None:
            raise TeacherError("give either a SAELens release + sae_id or a repo_id, not both", field="teacher")
        if not isinstance(release, str) or not _RELEASE.match(release):
            raise TeacherError(f"release {release!r} is not a SAELens release name", field="teacher.release")
        directory = saelens_directory()
        if release not in directory:
            raise TeacherError(f"unknown SAELens release {release!r}", field="teacher.release")
        entry = directory[release]
        if not isinstance(sae_id, str) or sae_id not in entry["saes"]:
            some = list(entry["saes"])[:5]
            raise TeacherError(f"sae_id {sae_id!r} is not in release {release!r} (e.g. {some})", field="teacher.sae_id")
        repo_id, subfolder, conversion = entry["repo_id"], entry["saes"][sae_id], entry["conversion_func"]
        subfolder = _check_subfolder(subfolder, "teacher.sae_id")
    else:
        if not isinstance(repo_id, str) or "://" in repo_id or not REPO_ID.match(repo_id):
            raise TeacherError(
                f"repo id {repo_id!r} must look like 'org/name' (URLs are not fetched)", field="teacher.repo_id"
            )
        subfolder = _check_subfolder(subfolder, "teacher.subfolder")
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise TeacherError(f"revision {revision!r} is not a branch, tag or commit name", field="teacher.revision")
    return repo_id, subfolder, conversion


def resolve_hub_teacher(
    *,
    repo_id: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    release: str | None = None,
    sae_id: str | None = None,
    cache_dir: str | Path | None = None,
    files: list[HubFile] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> HubTeacher:
    """Resolve a hub reference to a local teacher folder (download it unless offline).

    Args:
        repo_id, subfolder, revision: a hub repo ``org/name``, the SAE's folder in it, a branch/tag/commit.
        release, sae_id: a SAELens release and SAE id (instead of ``repo_id``; ``revision`` still applies).
        cache_dir: hub cache folder; default ``$HF_HUB_CACHE`` or the hub client's default.
        files: the repository's files as :func:`repo_files` listed them (the caller checked their size):
            the folder's files are then fetched one by one (:func:`download_files`, ``should_cancel`` asked
            before each). None: one ``snapshot_download`` (the cache alone when offline).
        should_cancel: see :func:`download_files` (only with ``files``).

    Returns:
        :class:`HubTeacher` with ``path`` = the snapshot folder joined with the subfolder.

    Raises:
        rsae.errors.Cancelled: ``should_cancel`` returned True between two files.
        TeacherError: malformed or URL-like ids (``field`` ``teacher.repo_id`` / ``teacher.subfolder`` /
            ``teacher.revision`` / ``teacher.release`` / ``teacher.sae_id``), an unknown release or SAE id, or the
            files are neither cached nor downloadable (offline, not found, no network): ``field="teacher"``.
    """
    repo_id, subfolder, conversion = check_hub_ref(
        repo_id=repo_id, subfolder=subfolder, revision=revision, release=release, sae_id=sae_id
    )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        wanted = folder_files(files, subfolder) if files is not None else []
        if wanted:
            root = download_files(repo_id, wanted, revision=revision, cache_dir=cache, should_cancel=should_cancel)
        else:
            root = snapshot_download(
                repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns, local_files_only=offline()
            )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise TeacherError(
            f"{repo_id}{'/' + subfolder if subfolder else ''} is not in the local hub cache "
            f"{cache or '(default)'} and the hub is {'offline' if offline() else 'unreachable'}: "
            f"{e}",
            field="teacher",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise TeacherError(f"could not fetch {repo_id}: {type(e).__name__}: {e}", field="teacher") from None
    path = Path(root) / subfolder if subfolder else Path(root)
    if not path.is_dir():
        raise TeacherError(
            f"{repo_id} has no folder {subfolder!r} (revision {revision or 'main'})",
            field="teacher.subfolder" if release is None else "teacher.sae_id",
        )
    norm = saelens_directory()[release]["norm_scaling_factor"].get(str(sae_id)) if release is not None else None
    return HubTeacher(path, repo_id, subfolder, revision, release, sae_id, conversion, norm)


# -- repository metadata and cancellable downloads ---------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf", ".ot")
"""Suffixes of weight files; a model download takes one format of them (:func:`model_files`)."""
_SIDE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository: its path in the repo and its size in bytes (from the hub's metadata)."""

    name: str
    size: int


def endpoint() -> str | None:
    """The hub endpoint to use, ``$HF_ENDPOINT`` read now (None: the hub client's default, huggingface.co)."""
    return os.environ.get("HF_ENDPOINT") or None


def repo_files(repo_id: str, revision: str | None = None, *, timeout: float = 10.0) -> list[HubFile] | None:
    """The files of model repository ``repo_id`` with their sizes, read from the hub's metadata (``GET
    /api/models/{repo_id}/revision/{revision}?blobs=true`` via ``HfApi.model_info(files_metadata=True)``);
    nothing is downloaded.

    Returns:
        The files, or None when the answer is unknown here: offline mode (:func:`offline`), the hub
        unreachable, timed out (``timeout`` seconds), or answering an error other than "not found".

    Raises:
        LookupError: the hub says the repository or revision does not exist (or is private to others).
    """
    if offline():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
    except RevisionNotFoundError:
        raise LookupError(f"{repo_id} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise LookupError(f"{repo_id} is not a model repository on the hub (or it is private)") from None
    except Exception:  # noqa: BLE001 - network down, timeout, 5xx, odd answer: unknown, not wrong
        return None
    return [HubFile(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]


def model_files(files: list[HubFile]) -> list[HubFile]:
    """The files of a model repository that loading it with ``from_pretrained`` uses: the top-level
    configuration and tokenizer files (``.json``, ``.txt``, ``.model``, ``.tiktoken``, ``.jinja``) and the
    weights in one format, safetensors when present, else PyTorch ``.bin``. Other formats (ONNX, GGUF, Flax,
    TF) and sub-folders are not counted nor fetched."""
    top = [f for f in files if "/" not in f.name]
    weights = [f for f in top if f.name.endswith(".safetensors")] or [f for f in top if f.name.endswith(".bin")]
    side = [f for f in top if f.name.endswith(_SIDE_SUFFIXES) and not f.name.endswith(WEIGHT_SUFFIXES)]
    return sorted(side, key=lambda f: f.name) + sorted(weights, key=lambda f: f.name)


def folder_files(files: list[HubFile], subfolder: str | None) -> list[HubFile]:
    """The files under ``subfolder`` of a repository (all of them when None): what a teacher reference fetches."""
    if not subfolder:
        return list(files)
    prefix = subfolder.strip("/") + "/"
    return [f for f in files if f.name.startswith(prefix)]


def download_files(
    repo_id: str,
    files: list[HubFile],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Path:
    """Download ``files`` of ``repo_id`` one at a time into the hub cache (``huggingface_hub.hf_hub_download``,
    endpoint :func:`endpoint`), asking ``should_cancel`` before each file, so that a cancelled job stops
    between files instead of after the whole repository.

    Returns:
        The local snapshot folder holding them (the files keep their repo paths under it).

    Raises:
        rsae.errors.Cancelled: ``should_cancel`` returned True (files already fetched stay in the cache).
        OSError, huggingface_hub errors: a download failed.
    """
    from huggingface_hub import hf_hub_download

    from .errors import Cancelled

    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    root: Path | None = None
    for f in files:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled while downloading {repo_id} (before {f.name})")
        local = hf_hub_download(repo_id, f.name, revision=revision, cache_dir=cache, endpoint=endpoint())
        root = Path(local).parents[len(Path(f.name).parts) - 1]
    if should_cancel is not None and should_cancel():
        raise Cancelled(f"cancelled while downloading {repo_id}")
    if root is None:
        raise LookupError(f"{repo_id}: nothing to download")
    return root
