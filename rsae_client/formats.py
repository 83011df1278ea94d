"""Which files make a teacher SAE in each supported format, and which one a folder holds.

The four layouts the service reads (``rsae.formats`` on the server; ``docs/formats.md``), each as the multipart
fields of ``POST /v1/saes`` -> the file name in the folder:

=====================  ==========================================================
format                 fields (file)
=====================  ==========================================================
``saelens``            ``cfg`` (cfg.json) + ``weights`` (sae_weights.safetensors)
``sparsify``           ``cfg`` (cfg.json) + ``sae`` (sae.safetensors)
``gemma_scope``        ``params`` (params.npz)
``dictionary_learning`` ``ae`` (ae.pt) + ``config`` (config.json)
=====================  ==========================================================

Detection follows the server's order (:func:`rsae.formats.detect_format`): SAELens, sparsify, Gemma Scope,
dictionary_learning, by the weights file present.
"""

from __future__ import annotations

from pathlib import Path

TEACHER_FORMATS: dict[str, dict[str, str]] = {
    "saelens": {"cfg": "cfg.json", "weights": "sae_weights.safetensors"},
    "sparsify": {"cfg": "cfg.json", "sae": "sae.safetensors"},
    "gemma_scope": {"params": "params.npz"},
    "dictionary_learning": {"ae": "ae.pt", "config": "config.json"},
}
"""Format -> {multipart field: file name}, in detection order."""


def teacher_files(folder: str | Path, format: str | None = None) -> tuple[str, dict[str, Path]]:
    """The format of the teacher SAE in ``folder`` and its files as ``{multipart field: path}``.

    Args:
        folder: the teacher's folder (a file inside it is taken as its folder, e.g. ``.../params.npz``).
        format: force one of :data:`TEACHER_FORMATS` instead of detecting it.

    Raises:
        ValueError: ``format`` is unknown; no format's weights file is in the folder; or a file that
            the format needs is missing (the message names it).
        FileNotFoundError: ``folder`` does not exist.
    """
    path = Path(folder)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"teacher folder {path} does not exist")
    if format is not None and format not in TEACHER_FORMATS:
        raise ValueError(f"unknown teacher format {format!r}; known: {', '.join(TEACHER_FORMATS)}")
    candidates = [format] if format is not None else list(TEACHER_FORMATS)
    for name in candidates:
        fields = TEACHER_FORMATS[name]
        weights = next(f for f in fields.values() if not f.endswith(".json"))
        if not (path / weights).is_file():
            continue
        missing = [f for f in fields.values() if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path}: {name} teacher without {', '.join(missing)}")
        return name, {field: path / fname for field, fname in fields.items()}
    expected = "; ".join(f"{n}: {' + '.join(f.values())}" for n, f in TEACHER_FORMATS.items())
    raise ValueError(f"no teacher SAE files recognised in {path} (expected {expected})")
