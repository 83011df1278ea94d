"""How much memory a teacher's weights file asks for once read, from its headers alone (nothing is
decompressed beyond a ``.npy`` header): the defence against decompression bombs and lying headers.

A teacher file is read whole into memory and converted to float32 (:mod:`rsae.formats`). Its size on disk
says little: a deflated ``params.npz`` or ``ae.pt`` of 600 KB holds 600 MB of zeros, and a safetensors header
may declare tensors far larger than the file. :func:`declared_bytes` adds up what each format declares:

- safetensors (SAELens ``sae_weights.safetensors``, sparsify ``sae.safetensors``; format spec
  https://github.com/huggingface/safetensors#format): the 8-byte little-endian header length, then the JSON
  header's ``dtype`` and ``shape`` of every tensor;
- ``params.npz`` (a zip of ``.npy`` members, NumPy NEP 1 format): the zip central directory's uncompressed
  ``file_size`` of every member (what :mod:`zipfile` will inflate at most), and each ``.npy`` header's shape x
  itemsize (what :func:`numpy.load` allocates);
- ``ae.pt`` (``torch.save``'s zip format): the members' uncompressed ``file_size`` (the storages); a legacy
  non-zip pickle is not compressed, so its file size.

Every tensor counts ``numel * max(itemsize, 4)`` bytes, as it is held once converted to float32. A header
that cannot be parsed counts the file size: the format's own loader then reports it unreadable.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np

from .errors import TeacherTooLargeError
from .formats import DL_WEIGHTS, GEMMA_SCOPE_PARAMS, SPARSIFY_WEIGHTS, detect_format
from .saes import WEIGHTS_NAME

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
"""Bytes per element of the safetensors dtypes (``safetensors/src/tensor.rs``, ``Dtype::size``)."""
MAX_SAFETENSORS_HEADER = 100_000_000
"""Largest safetensors JSON header read (the library's own limit, ``MAX_HEADER_SIZE``)."""


def _numel(shape: object) -> int | None:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return math.prod(shape)


def _safetensors_bytes(f: Path) -> int:
    """Float32-equivalent bytes declared by a safetensors header (the file size if it cannot be parsed)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return size
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            return size
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError):
            return size
    if not isinstance(header, dict):
        return size
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        numel = _numel(info.get("shape"))
        if numel is None:
            return max(total, size)
        total += numel * max(4, SAFETENSORS_DTYPE_BYTES.get(str(info.get("dtype")), 8))
    return max(total, size)


def _npy_bytes(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Float32-equivalent bytes a ``.npy`` member's header declares (0 when it has no readable header)."""
    try:
        with z.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    except Exception:  # noqa: BLE001 - untrusted bytes; np.load reports the member unreadable later
        return 0
    return math.prod(shape) * max(4, dtype.itemsize)


def _zip_bytes(f: Path, npy: bool) -> int:
    """Uncompressed bytes a zip declares (and, with ``npy``, its ``.npy`` headers), or the file size for a
    file that is not a zip."""
    size = f.stat().st_size
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
            total = sum(i.file_size for i in infos)
            if npy:
                total = max(total, sum(_npy_bytes(z, i) for i in infos if i.filename.endswith(".npy")))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return size
    return max(total, size)


def declared_bytes(path: str | Path, *, format: str | None = None, hookpoint: str | None = None) -> dict[str, int]:
    """Bytes the weights file of the teacher at ``path`` declares, float32-equivalent (see the module docstring).

    Args:
        path, format, hookpoint: as :func:`rsae.formats.load_teacher`.

    Returns:
        ``{file name: bytes}`` for the format's weights file (empty when it is absent: the loader reports that).

    Raises:
        TeacherError: see :func:`rsae.formats.detect_format`.
    """
    fmt, folder = detect_format(path, hookpoint=hookpoint)
    fmt = format or fmt
    name, measure = {
        "saelens": (WEIGHTS_NAME, _safetensors_bytes),
        "sparsify": (SPARSIFY_WEIGHTS, _safetensors_bytes),
        "gemma_scope": (GEMMA_SCOPE_PARAMS, lambda f: _zip_bytes(f, npy=True)),
        "dictionary_learning": (DL_WEIGHTS, lambda f: _zip_bytes(f, npy=False)),
    }.get(fmt, (None, None))
    if name is None or not (folder / name).is_file():
        return {}
    return {name: measure(folder / name)}


def check_declared_size(
    path: str | Path, max_bytes: int, *, format: str | None = None, hookpoint: str | None = None
) -> int:
    """Refuse a teacher whose weights file declares more than ``max_bytes`` (:func:`declared_bytes`), before
    any of its data is read.

    Returns:
        The declared bytes (0 when the weights file is absent).

    Raises:
        TeacherTooLargeError: over the limit; ``field`` is the file name (e.g. ``params.npz``).
        TeacherError: see :func:`rsae.formats.detect_format`.
    """
    for name, n in declared_bytes(path, format=format, hookpoint=hookpoint).items():
        if n > max_bytes:
            raise TeacherTooLargeError(
                f"{name} declares {n:,} bytes of tensors once read as float32 (its headers: zip members' "
                f"uncompressed sizes, array shapes), more than the limit of {max_bytes:,} bytes; a compressed "
                "file is counted by what it expands to",
                field=name,
            )
        return n
    return 0
