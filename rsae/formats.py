"""Teacher SAEs in the public file formats researchers bring, loaded into the project's own SAE classes.

Four layouts are read (each documented in ``docs/formats.md``), and each yields a
:class:`rsae.saes.ReLUSAE`, :class:`rsae.saes.JumpReLUSAE` or :class:`rsae.saes.TopKSAE` whose ``encode`` /
``decode`` reproduce the original library's own forward pass on the same activations:

- ``"saelens"`` (SAELens 6, ``sae_lens/saes/*.py``): ``cfg.json`` + ``sae_weights.safetensors`` holding
  ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] (+ ``threshold``
  [d_sae] for ``jumprelu``); architectures ``standard``, ``jumprelu``, ``topk`` (``k`` and
  ``rescale_acts_by_decoder_norm`` in the cfg), and pre-6.0 cfgs (``activation_fn_str: "topk"``).
- ``"gemma_scope"`` (Lieberum et al. 2024, "Gemma Scope"; the published ``params.npz`` of
  ``google/gemma-scope-*``): ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``,
  ``threshold``; JumpReLU; ``b_dec`` is *not* subtracted before encoding.
- ``"sparsify"`` (EleutherAI ``sparsify``, ``SparseCoder.save_to_disk``): ``cfg.json`` (``d_in``, ``k``,
  ``num_latents`` / ``expansion_factor``, ...) + ``sae.safetensors`` holding ``encoder.weight``
  [d_sae, d_in] (an ``nn.Linear``), ``encoder.bias`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in];
  TopK after ReLU, ``b_dec`` subtracted before encoding. A run folder with one sub-folder per hookpoint
  needs ``hookpoint=``.
- ``"dictionary_learning"`` (saprmarks/dictionary_learning, ``ae.pt`` state dict + ``config.json`` from
  ``trainSAE``): ``AutoEncoder`` (ReLU; ``encoder``/``decoder`` ``nn.Linear`` + ``bias`` = b_dec),
  ``AutoEncoderNew`` (ReLU, decoder bias, no b_dec subtraction), ``JumpReluAutoEncoder`` (``W_enc``...,
  ``threshold``, no b_dec subtraction), ``AutoEncoderTopK`` (``k`` a buffer; per-token top-k), and
  ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` (inference gate: one global ``threshold``, i.e. a JumpReLU
  with equal thresholds). ``ae.pt`` is read with ``torch.load(weights_only=True)``: pickled objects are
  refused.

Every conversion (transposes, folded decoder norms, b_dec handling, where k came from, dropped unit scaling
factors, normalisation) is listed in :attr:`DetectedFormat.conventions`. Errors are
:class:`rsae.errors.TeacherError` with ``field`` naming the offending file or key
(``"params.npz.threshold"``, ``"cfg.json.k"``, ``"ae.pt"``).

Entry points: :func:`load_teacher` (detect + load), :func:`import_teacher` (load + save in the project's
SAELens layout, which the pipeline reads), :func:`detect_format`, :func:`provenance`.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import TeacherError
from .saes import CFG_NAME, MAX_DIM, SAE, WEIGHTS_NAME, get_family, sha256_file
from .saes.normalization import NormFold, fold_normalization, resolve_normalization
from .versions import package_versions

FORMATS: tuple[str, ...] = ("saelens", "gemma_scope", "sparsify", "dictionary_learning")
"""Names of the supported teacher formats (values of :attr:`DetectedFormat.format`)."""

SPARSIFY_WEIGHTS = "sae.safetensors"
"""EleutherAI sparsify weights file (beside :data:`rsae.saes.CFG_NAME`)."""
GEMMA_SCOPE_PARAMS = "params.npz"
"""Gemma Scope parameters file."""
DL_WEIGHTS = "ae.pt"
"""dictionary_learning state dict."""
DL_CONFIG = "config.json"
"""dictionary_learning training config."""

_MIN_THRESHOLD = float(torch.finfo(torch.float32).tiny)
"""Thresholds <= 0 are raised to this (the smallest normal float32): ``relu(h) * 1[h > theta]`` with
theta <= 0 equals ``h * 1[h > tiny]`` except for 0 < h <= 1.2e-38."""


@dataclass
class DetectedFormat:
    """What was found in a teacher folder and how it was read.

    Attributes:
        format: one of :data:`FORMATS`.
        family: ``"relu"``, ``"jumprelu"`` or ``"topk"`` (the project's gate family).
        source_architecture: the source's own name (SAELens ``architecture``, dictionary_learning
            ``dict_class``, ``"SparseCoder"``, ``"gemma-scope-jumprelu"``).
        d_in, d_sae: widths of activations and latents.
        apply_b_dec_to_input: whether ``b_dec`` is subtracted from x before encoding.
        conventions: human-readable list of every convention detected and conversion applied.
        k: active latents per token (TopK), else None.
        hook_name, hook_layer, model_name: where the SAE was trained, when the files say so.
        files: file name -> sha256 (hex) of each file read.
        path: the folder read.
    """

    format: str
    family: str
    source_architecture: str
    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool
    conventions: list[str] = field(default_factory=list)
    k: int | None = None
    hook_name: str | None = None
    hook_layer: int | None = None
    model_name: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return asdict(self)


@dataclass
class LoadedTeacher:
    """A loaded teacher: ``sae`` (ReLUSAE / JumpReLUSAE / TopKSAE, CPU, float32, eval mode) and how it was read."""

    sae: SAE
    detected: DetectedFormat


# -- small helpers ---------------------------------------------------------------------------------------------


def _tensor(t: Any, shape: tuple[int, ...], field_: str) -> torch.Tensor:
    """``t`` as a float32 CPU tensor of ``shape``; TeacherError(field=field_) if not floating, misshapen, or
    non-finite."""
    if isinstance(t, np.ndarray):
        if t.dtype.kind != "f":
            raise TeacherError(f"{field_} has dtype {t.dtype}; a floating dtype is required", field=field_)
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise TeacherError(f"{field_} is a {type(t).__name__}, not a tensor", field=field_)
    if not t.is_floating_point():
        raise TeacherError(f"{field_} has dtype {t.dtype}; a floating dtype is required", field=field_)
    if tuple(t.shape) != tuple(shape):
        raise TeacherError(f"{field_} has shape {list(t.shape)}, expected {list(shape)}", field=field_)
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise TeacherError(f"{field_} contains NaN or Inf", field=field_)
    return t


def _dim(v: Any, field_: str) -> int:
    """A width in [1, MAX_DIM] (TeacherError otherwise)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
        raise TeacherError(f"{field_} must be an integer in [1, {MAX_DIM}], got {v!r}", field=field_)
    return v


def _k(v: Any, d_sae: int, field_: str) -> int:
    """k as an int in [1, d_sae]; integral floats (SAELens >= 6.11 allows float k) are accepted."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= d_sae:
        raise TeacherError(f"{field_} (k) must be an integer in [1, d_sae={d_sae}], got {v!r}", field=field_)
    return v


def _raise_if_out_of_memory(e: BaseException) -> None:
    """Re-raise an allocation failure (``MemoryError``, torch's "can't allocate memory" ``RuntimeError``) caught
    by a broad handler of untrusted bytes: running out of memory is not a malformed file, and a caller bounding
    the reader's memory (the API's import child) must see it."""
    text = str(e).lower()
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and ("allocate" in text or "out of memory" in text)):
        raise e


def _read_json(f: Path, field_: str) -> dict[str, Any]:
    """The JSON object in ``f``; TeacherError(field=field_) if missing, not UTF-8 JSON, nested too deeply, or not
    an object."""
    if not f.is_file():
        raise TeacherError(f"missing {f.name} in {f.parent}", field=field_)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TeacherError(f"{f.name} is not valid JSON: {e}", field=field_) from None
    except RecursionError:  # nested past the interpreter's recursion limit (~1000 levels): was a 500
        raise TeacherError(f"{f.name} is nested too deeply to be a config", field=field_) from None
    if not isinstance(d, dict):
        raise TeacherError(f"{f.name} must be a JSON object", field=field_)
    return d


def _read_safetensors(f: Path, field_: str) -> dict[str, torch.Tensor]:
    """The tensors in safetensors file ``f`` (as stored, CPU); TeacherError(field=field_) if missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not f.is_file():
        raise TeacherError(f"missing {f.name} in {f.parent}", field=field_)
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        _raise_if_out_of_memory(e)
        raise TeacherError(f"{f.name} is not a readable safetensors file: {e}", field=field_) from None


def _layer_of(hook_name: str | None) -> int | None:
    """The layer index in a hook name (``blocks.3.hook_resid_post``, ``layers.3``), else None."""
    m = re.search(r"(?:blocks|layers?)[._](\d+)", hook_name) if isinstance(hook_name, str) else None
    return int(m.group(1)) if m else None


def _thresholds(th: torch.Tensor, conventions: list[str]) -> torch.Tensor:
    """Raise thresholds <= 0 to the smallest normal float32 (see :data:`_MIN_THRESHOLD`), noting how many."""
    n = int((th <= 0).sum())
    if n:
        conventions.append(
            f"{n} threshold(s) <= 0 raised to {_MIN_THRESHOLD:.3g}: the source gate "
            "relu(h) * 1[h > theta] equals h * 1[h > max(theta, 0)] there"
        )
        th = th.clamp_min(_MIN_THRESHOLD)
    return th


def _build(
    family: str,
    d_in: int,
    d_sae: int,
    tensors: dict[str, torch.Tensor],
    *,
    apply_b_dec: bool,
    k: int | None = None,
    threshold: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> SAE:
    """Instantiate the project's class for ``family`` from validated float32 tensors."""
    cfg: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": apply_b_dec,
        "metadata": metadata or {},
    }
    if family == "topk":
        cfg["k"] = k
    parts = dict(tensors)
    if family == "jumprelu":
        parts["threshold"] = threshold
    sae = get_family(family).sae_class.from_parts(cfg, parts)
    return sae.eval()


def _files(folder: Path, names: list[str]) -> dict[str, str]:
    """File name -> sha256 (hex) of those of ``names`` present in ``folder``."""
    return {n: sha256_file(folder / n) for n in names if (folder / n).is_file()}


def _fold_decoder_norm(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold per-latent decoder row norms n [d_sae] into the encoder: W_enc * n, b_enc * n, W_dec / n.
    SAELens ``TopKSAE`` with ``rescale_acts_by_decoder_norm`` computes h * n before top-k and divides by n
    before decoding; the folded SAE gives the same top-k set and reconstruction, latents scaled by n."""
    n = W_dec.norm(dim=-1)
    if (n <= 0).any():
        raise TeacherError("W_dec has an all-zero row; its decoder norm cannot be folded", field="W_dec")
    return W_enc * n, b_enc * n, W_dec / n[:, None]


# -- format detection ------------------------------------------------------------------------------------------


def _sparsify_children(folder: Path) -> list[str]:
    """Sorted names of the sub-folders holding a sparsify coder (``cfg.json`` + ``sae.safetensors``)."""
    return sorted(
        p.name for p in folder.iterdir() if p.is_dir() and (p / SPARSIFY_WEIGHTS).is_file() and (p / CFG_NAME).is_file()
    )


def detect_format(path: str | Path, *, hookpoint: str | None = None) -> tuple[str, Path]:
    """Which format a teacher folder (or one of its files) holds, from the file names alone.

    Args:
        path: a folder, or a file in it (``params.npz``, ``ae.pt``, ``cfg.json``, ...).
        hookpoint: sub-folder of a sparsify run folder holding one coder per hookpoint (e.g. ``"layers.3"``).

    Returns:
        ``(format, folder)`` with format in :data:`FORMATS` and the folder to read.

    Raises:
        TeacherError: path missing, no recognised file set, an ambiguous sparsify run folder without
            ``hookpoint``, or a ``hookpoint`` that escapes the folder.
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise TeacherError(f"teacher path {path} does not exist", field="teacher")
    if hookpoint is not None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*", hookpoint) or ".." in hookpoint.split("/"):
            raise TeacherError(f"hookpoint {hookpoint!r} is not a plain relative folder name", field="hookpoint")
        p = p / hookpoint
        if not p.is_dir():
            raise TeacherError(f"hookpoint folder {hookpoint!r} not found in {path}", field="hookpoint")
    if (p / WEIGHTS_NAME).is_file():
        return "saelens", p
    if (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify", p
    if (p / GEMMA_SCOPE_PARAMS).is_file():
        return "gemma_scope", p
    if (p / DL_WEIGHTS).is_file():
        return "dictionary_learning", p
    kids = _sparsify_children(p)
    if kids:
        raise TeacherError(
            f"{p} is a sparsify run folder with one coder per hookpoint; choose one with "
            f"hookpoint= (found: {kids[:20]})",
            field="hookpoint",
        )
    raise TeacherError(
        f"no SAE files recognised in {p}: expected {CFG_NAME} + {WEIGHTS_NAME} (SAELens), "
        f"{CFG_NAME} + {SPARSIFY_WEIGHTS} (sparsify), {GEMMA_SCOPE_PARAMS} (Gemma Scope) or "
        f"{DL_WEIGHTS} + {DL_CONFIG} (dictionary_learning)",
        field="teacher",
    )


# -- SAELens ---------------------------------------------------------------------------------------------------

_SAELENS_FAMILY = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}


def _saelens_architecture(cfg: dict[str, Any], conv: list[str]) -> tuple[str, str, Any]:
    """``(architecture, family, raw k)`` from a SAELens 6 cfg (``architecture``, ``k``) or a pre-6.0 one
    (``activation_fn_str``, ``activation_fn_kwargs.k``). Raises TeacherError (``cfg.json.activation_fn_str``,
    ``cfg.json.architecture``) for another gate, a rational SAE or an unsupported architecture."""
    arch = cfg.get("architecture")
    k_raw = cfg.get("k")
    if arch is None:  # pre-6.0 cfg: the gate is activation_fn(_str)
        act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        kw = cfg.get("activation_fn_kwargs") or {}
        if act == "topk":
            arch, k_raw = "topk", (kw.get("k") if isinstance(kw, dict) else None)
            conv.append("pre-6.0 SAELens cfg: activation_fn_str 'topk', k from activation_fn_kwargs")
        elif act == "relu":
            arch = "standard"
            conv.append("pre-6.0 SAELens cfg without 'architecture': standard (ReLU)")
        else:
            raise TeacherError(
                f"SAELens activation_fn {act!r} is not supported (relu or topk)", field="cfg.json.activation_fn_str"
            )
    if not isinstance(arch, str):
        raise TeacherError(f"cfg.json 'architecture' must be a string, got {arch!r}", field="cfg.json.architecture")
    if arch == "rational":
        raise TeacherError(
            "this folder holds a rational SAE (already upgraded), not a teacher", field="cfg.json.architecture"
        )
    if arch not in _SAELENS_FAMILY:
        raise TeacherError(
            f"SAELens architecture {arch!r} is not supported as a teacher; supported: {sorted(_SAELENS_FAMILY)}",
            field="cfg.json.architecture",
        )
    return arch, _SAELENS_FAMILY[arch], k_raw


def _saelens_apply_b_dec(cfg: dict[str, Any], conv: list[str]) -> bool:
    """``apply_b_dec_to_input`` (default True); TeacherError(``cfg.json.apply_b_dec_to_input``) if not a bool."""
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise TeacherError("cfg.json 'apply_b_dec_to_input' must be a boolean", field="cfg.json.apply_b_dec_to_input")
    conv.append(f"apply_b_dec_to_input={apply_b_dec} (from cfg.json)")
    return apply_b_dec


def _saelens_normalisation(
    cfg: dict[str, Any], folder: Path, conv: list[str], norm_scaling_factor: float | None
) -> NormFold | None:
    """What to fold for ``normalize_activations`` (:func:`rsae.saes.normalization.resolve_normalization`; bool
    before 6.0), noted in ``conv``; TeacherError(``cfg.json.normalize_activations``) where it cannot be folded;
    a ``hook_z`` input reshape and a single head (``hook_head_index``: TeacherError) are checked too."""
    fold = resolve_normalization(cfg, folder, norm_scaling_factor=norm_scaling_factor)
    if fold is not None:
        conv.append(fold.note())
    if cfg.get("reshape_activations") == "hook_z":
        conv.append("reshape_activations='hook_z': inputs are the heads flattened to [..., n_heads * d_head]")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    head = meta.get("hook_head_index", cfg.get("hook_head_index"))
    if head is not None:
        raise TeacherError(
            f"hook_head_index={head!r}: the SAE reads one attention head's z; only all heads (hook_head_index "
            "null, reshape_activations 'hook_z') can be upgraded",
            field="cfg.json.hook_head_index",
        )
    return fold


def _saelens_weights(folder: Path, cfg: dict[str, Any], conv: list[str]) -> dict[str, torch.Tensor]:
    """``sae_weights.safetensors`` as read, less the (all-ones) scaling factors; TeacherError
    (``sae_weights.safetensors[.<key>]``) if unreadable or a scaling factor is not all ones."""
    raw = _read_safetensors(folder / WEIGHTS_NAME, WEIGHTS_NAME)
    f = WEIGHTS_NAME + "."
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in raw:
            sf = raw.pop(key)
            if not torch.allclose(sf.float(), torch.ones_like(sf, dtype=torch.float32)):
                raise TeacherError(
                    f"tensor '{key}' is not all ones; fine-tuning scaling factors are not supported", field=f + key
                )
            conv.append(f"'{key}' of ones dropped")
    src_dtype = {str(t.dtype).replace("torch.", "") for t in raw.values() if t.is_floating_point()}
    if cfg.get("dtype", "float32") != "float32" or src_dtype - {"float32"}:
        conv.append(f"weights converted from {sorted(src_dtype) or cfg.get('dtype')} to float32")
    return raw


def _saelens_core(raw: dict[str, torch.Tensor], d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    """The four core tensors as float32: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in];
    TeacherError(``sae_weights.safetensors.<name>``) if one is missing, misshapen or non-finite."""
    f = WEIGHTS_NAME + "."
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if n not in raw:
            raise TeacherError(f"tensor '{n}' missing from {WEIGHTS_NAME}", field=f + n)
    return {
        "W_enc": _tensor(raw["W_enc"], (d_in, d_sae), f + "W_enc"),
        "b_enc": _tensor(raw["b_enc"], (d_sae,), f + "b_enc"),
        "W_dec": _tensor(raw["W_dec"], (d_sae, d_in), f + "W_dec"),
        "b_dec": _tensor(raw["b_dec"], (d_in,), f + "b_dec"),
    }


def _saelens_topk(
    cfg: dict[str, Any], k_raw: Any, d_sae: int, t: dict[str, torch.Tensor], conv: list[str]
) -> tuple[int, dict[str, torch.Tensor]]:
    """TopK: ``(k, tensors)`` with the decoder norms folded into the encoder when
    ``rescale_acts_by_decoder_norm``. TeacherError(``cfg.json.k``) for a bad k, (``W_dec``) for a zero row."""
    k = _k(k_raw, d_sae, "cfg.json.k")
    conv.append(f"k={k} from cfg.json")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        W_enc, b_enc, W_dec = _fold_decoder_norm(t["W_enc"], t["b_enc"], t["W_dec"])
        t = {**t, "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec}
        conv.append(
            "rescale_acts_by_decoder_norm=True folded: W_enc, b_enc scaled by ||W_dec[j]||, W_dec "
            "rows normalised (same top-k set and reconstruction; latents scaled by the norms)"
        )
    return k, t


def _saelens_threshold(raw: dict[str, torch.Tensor], d_sae: int, conv: list[str]) -> torch.Tensor:
    """JumpReLU thresholds [d_sae] from ``threshold`` or ``exp(log_threshold)``, <= 0 raised (see
    :func:`_thresholds`); TeacherError(``sae_weights.safetensors.<name>``) if absent, misshapen or non-finite."""
    f = WEIGHTS_NAME + "."
    if "threshold" in raw:
        threshold = _tensor(raw["threshold"], (d_sae,), f + "threshold")
    elif "log_threshold" in raw:
        threshold = _tensor(raw["log_threshold"], (d_sae,), f + "log_threshold").exp()
        conv.append("threshold = exp(log_threshold) (SAELens training checkpoint)")
    else:
        raise TeacherError("a jumprelu SAE needs tensor 'threshold'", field=f + "threshold")
    return _thresholds(threshold, conv)


def _saelens_hook(cfg: dict[str, Any]) -> tuple[dict[str, Any], str | None, int | None, str | None]:
    """``(metadata, hook_name, hook_layer, model_name)`` from the cfg's ``metadata`` (SAELens 6) or top level
    (pre-6.0); the layer is parsed from the hook name when not given. Non-strings become None."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    layer = meta.get("hook_layer", cfg.get("hook_layer"))
    layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else _layer_of(hook)
    model = meta.get("model_name") or cfg.get("model_name")
    return meta, hook if isinstance(hook, str) else None, layer, model if isinstance(model, str) else None


def load_saelens(path: str | Path, *, norm_scaling_factor: float | None = None) -> LoadedTeacher:
    """Load a SAELens-layout folder (``cfg.json`` + ``sae_weights.safetensors``), SAELens 6 or pre-6 cfg.

    Reproduces ``sae_lens.SAE.load_from_disk(path)`` followed by ``encode`` / ``decode`` of
    ``StandardSAE`` (relu(h)), ``JumpReLUSAE`` (relu(h) * 1[h > threshold]) and ``TopKSAE`` (ReLU of the
    per-token top-k of h; with ``rescale_acts_by_decoder_norm`` the decoder norms are folded into the
    encoder, which gives the same reconstruction). h = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc,
    x [..., d_in] -> z [..., d_sae] -> x_hat = z @ W_dec + b_dec.

    ``normalize_activations`` other than ``"none"`` is folded into W_enc / b_dec / W_dec as SAELens's own folds
    do (:mod:`rsae.saes.normalization`; the factor from ``norm_scaling_factor`` (a SAELens release's), the cfg
    or the checkpoint's files), recorded in the conventions and in ``metadata.activation_normalization``.

    Raises:
        TeacherError: missing/corrupt files; unsupported architecture (gated, transcoders, ...), a
            normalisation that cannot be folded (``layer_norm``, ``constant_norm_rescale``, a factor nowhere
            to be found: ``cfg.json.normalize_activations``), one attention head (``cfg.json.hook_head_index``),
            a non-unit fine-tuning scaling factor; wrong shapes, non-finite values, bad k.
    """
    folder = Path(path)
    cfg = _read_json(folder / CFG_NAME, "cfg.json")
    d_in = _dim(cfg.get("d_in"), "cfg.json.d_in")
    d_sae = _dim(cfg.get("d_sae"), "cfg.json.d_sae")
    conv: list[str] = []
    arch, family, k_raw = _saelens_architecture(cfg, conv)
    apply_b_dec = _saelens_apply_b_dec(cfg, conv)
    fold = _saelens_normalisation(cfg, folder, conv, norm_scaling_factor)
    raw = _saelens_weights(folder, cfg, conv)
    t = _saelens_core(raw, d_in, d_sae)
    if fold is not None:  # before the decoder-norm fold of TopK: the order SAELens applies them in
        t = fold_normalization(t, fold, apply_b_dec_to_input=apply_b_dec)
        meta_extra = {"activation_normalization": fold.record()}
    else:
        meta_extra = {}
    k = threshold = None
    if family == "topk":
        k, t = _saelens_topk(cfg, k_raw, d_sae, t, conv)
    elif family == "jumprelu":
        threshold = _saelens_threshold(raw, d_sae, conv)
    meta, hook, layer, model = _saelens_hook(cfg)
    det = DetectedFormat(
        "saelens",
        family,
        str(arch),
        d_in,
        d_sae,
        apply_b_dec,
        conv,
        k,
        hook,
        layer,
        model,
        _files(folder, [CFG_NAME, WEIGHTS_NAME]),
        str(folder),
    )
    sae = _build(
        family,
        d_in,
        d_sae,
        t,
        apply_b_dec=apply_b_dec,
        k=k,
        threshold=threshold,
        metadata={**_metadata(meta, det), **meta_extra},
    )
    return LoadedTeacher(sae, det)


# -- Gemma Scope -----------------------------------------------------------------------------------------------


def _gemma_scope_site(folder: Path, conv: list[str]) -> tuple[str | None, int | None]:
    """``(hook_name, hook_layer)`` from the folder names (``.../gemma-scope-2b-pt-res/layer_12/width_16k/
    average_l0_82``; residual, MLP-out or attention (``-att``: ``attn.hook_z``, the heads' concatenated z)
    site), noting width and average L0; None where they do not say."""
    parts = "/".join(folder.resolve().parts[-6:])  # hub cache: models--org--name/snapshots/<sha>/layer_N/...
    m = re.search(r"layer_(\d+)", parts)
    layer = int(m.group(1)) if m else None
    hook = None
    if layer is not None:
        site = "hook_resid_post" if re.search(r"-res\b|-res-|resid", parts) else None
        site = site or ("hook_mlp_out" if "-mlp" in parts else None)
        site = site or ("attn.hook_z" if re.search(r"-att\b|-att-", parts) else None)
        hook = f"blocks.{layer}.{site}" if site else None
    w = re.search(r"width_(\w+?)(?:/|$)", parts)
    l0 = re.search(r"average_l0_(\d+)", parts)
    if w or l0:
        conv.append(
            f"from the folder names: width={w.group(1) if w else None}, average_l0={int(l0.group(1)) if l0 else None}"
        )
    return hook, layer


def load_gemma_scope(path: str | Path) -> LoadedTeacher:
    """Load a Gemma Scope ``params.npz`` (JumpReLU; Lieberum et al. 2024, published layout of
    ``google/gemma-scope-*``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae],
    ``b_dec`` [d_in], ``threshold`` [d_sae]; lower-case ``w_enc`` / ``w_dec`` accepted as SAELens does).

    The published forward: h = x @ W_enc + b_enc (b_dec *not* subtracted), z = 1[h > threshold] * relu(h),
    x_hat = z @ W_dec + b_dec. d_in and d_sae come from the shapes; layer, width and average L0 from the
    folder names (``layer_12/width_16k/average_l0_82``) when present. Read with ``allow_pickle=False``.

    Raises:
        TeacherError: unreadable npz (or one holding pickled objects), a missing array, inconsistent shapes,
            non-finite values.
    """
    folder = Path(path)
    fpath = folder / GEMMA_SCOPE_PARAMS
    if not fpath.is_file():
        raise TeacherError(f"missing {GEMMA_SCOPE_PARAMS} in {folder}", field=GEMMA_SCOPE_PARAMS)
    try:
        with np.load(fpath, allow_pickle=False) as data:
            arrays = {("W_" + key[2:] if key.startswith("w_") else key): data[key] for key in data.files}
    except Exception as e:  # noqa: BLE001 - untrusted bytes: zipfile / numpy raise ValueError, OSError,
        # BadZipFile, KeyError, NotImplementedError ("compressed patched data", found by fuzzing), ...
        _raise_if_out_of_memory(e)
        raise TeacherError(
            f"{GEMMA_SCOPE_PARAMS} is not a readable numpy .npz of plain arrays: {e}", field=GEMMA_SCOPE_PARAMS
        ) from None
    f = GEMMA_SCOPE_PARAMS + "."
    for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        if n not in arrays:
            raise TeacherError(f"array '{n}' missing from {GEMMA_SCOPE_PARAMS} (found {sorted(arrays)})", field=f + n)
    if arrays["W_enc"].ndim != 2:
        raise TeacherError(
            f"W_enc must be 2-D [d_in, d_sae], got shape {list(arrays['W_enc'].shape)}", field=f + "W_enc"
        )
    d_in = _dim(int(arrays["W_enc"].shape[0]), f + "W_enc")
    d_sae = _dim(int(arrays["W_enc"].shape[1]), f + "W_enc")
    t = {
        "W_enc": _tensor(arrays["W_enc"], (d_in, d_sae), f + "W_enc"),
        "b_enc": _tensor(arrays["b_enc"], (d_sae,), f + "b_enc"),
        "W_dec": _tensor(arrays["W_dec"], (d_sae, d_in), f + "W_dec"),
        "b_dec": _tensor(arrays["b_dec"], (d_in,), f + "b_dec"),
    }
    conv = [
        "apply_b_dec_to_input=False (Gemma Scope encodes x @ W_enc + b_enc)",
        "JumpReLU gate z = 1[h > threshold] * relu(h), thresholds from params.npz",
        "d_in, d_sae from the shape of W_enc",
    ]
    threshold = _thresholds(_tensor(arrays["threshold"], (d_sae,), f + "threshold"), conv)
    extra = sorted(set(arrays) - {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"})
    if extra:
        conv.append(f"ignored arrays: {extra}")
    hook, layer = _gemma_scope_site(folder, conv)
    det = DetectedFormat(
        "gemma_scope",
        "jumprelu",
        "gemma-scope-jumprelu",
        d_in,
        d_sae,
        False,
        conv,
        None,
        hook,
        layer,
        None,
        _files(folder, [GEMMA_SCOPE_PARAMS]),
        str(folder),
    )
    sae = _build("jumprelu", d_in, d_sae, t, apply_b_dec=False, threshold=threshold, metadata=_metadata({}, det))
    return LoadedTeacher(sae, det)


# -- EleutherAI sparsify ---------------------------------------------------------------------------------------


def _sparsify_check_supported(cfg: dict[str, Any]) -> None:
    """Refuse what the TopK family cannot reproduce: TeacherError(``cfg.json.<key>``) for a transcoder, a skip
    connection, an activation other than ``topk``, or a signed coder."""
    if cfg.get("transcode"):
        raise TeacherError(
            "a sparsify transcoder predicts another module's output; only autoencoders can be upgraded",
            field="cfg.json.transcode",
        )
    if cfg.get("skip_connection"):
        raise TeacherError(
            "sparsify coders with a skip connection (W_skip) are not supported", field="cfg.json.skip_connection"
        )
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise TeacherError(f"sparsify activation {act!r} is not supported (topk only)", field="cfg.json.activation")
    if cfg.get("signed"):
        raise TeacherError("signed sparsify coders are not supported", field="cfg.json.signed")


def _sparsify_d_sae(cfg: dict[str, Any], d_in: int) -> tuple[int, list[str]]:
    """``(d_sae, conventions)``: ``num_latents`` when set, else ``d_in * expansion_factor`` (default 32);
    TeacherError(``cfg.json.num_latents`` / ``cfg.json.expansion_factor``) outside [1, MAX_DIM]."""
    n_lat = cfg.get("num_latents") or 0
    if n_lat:
        d_sae = _dim(n_lat, "cfg.json.num_latents")
        return d_sae, [f"d_sae={d_sae} from num_latents"]
    ef = _dim(cfg.get("expansion_factor", 32), "cfg.json.expansion_factor")
    d_sae = _dim(d_in * ef, "cfg.json.expansion_factor")
    return d_sae, [f"d_sae = d_in * expansion_factor = {d_sae}"]


def _sparsify_tensors(raw: dict[str, torch.Tensor], d_in: int, d_sae: int, conv: list[str]) -> dict[str, torch.Tensor]:
    """float32 W_enc = encoder.weight.T [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (a [d_in, d_sae]
    one transposed back), b_dec [d_in]; TeacherError(``sae.safetensors.<name>``) for W_skip, a missing,
    misshapen or non-finite tensor."""
    f = SPARSIFY_WEIGHTS + "."
    if "W_skip" in raw:
        raise TeacherError("sae.safetensors holds W_skip (skip connection); not supported", field=f + "W_skip")
    if "W_dec" not in raw:
        raise TeacherError("sae.safetensors has no W_dec (coder saved without decoder)", field=f + "W_dec")
    for n in ("encoder.weight", "encoder.bias", "b_dec"):
        if n not in raw:
            raise TeacherError(f"tensor '{n}' missing from {SPARSIFY_WEIGHTS}", field=f + n)
    W_dec = raw["W_dec"]
    if tuple(W_dec.shape) == (d_in, d_sae) and d_in != d_sae:
        W_dec = W_dec.T
        conv.append("W_dec stored as [d_in, d_sae]: transposed to [d_sae, d_in]")
    else:
        conv.append("W_dec stored as [d_sae, d_in] (sparsify layout)")
    src = {str(t.dtype).replace("torch.", "") for t in raw.values()}
    if src - {"float32"}:
        conv.append(f"weights converted from {sorted(src)} to float32")
    return {
        "W_enc": _tensor(raw["encoder.weight"], (d_sae, d_in), f + "encoder.weight").T.contiguous(),
        "b_enc": _tensor(raw["encoder.bias"], (d_sae,), f + "encoder.bias"),
        "W_dec": _tensor(W_dec, (d_sae, d_in), f + "W_dec"),
        "b_dec": _tensor(raw["b_dec"], (d_in,), f + "b_dec"),
    }


def _sparsify_hook(folder: Path, conv: list[str]) -> tuple[str | None, int | None, str | None]:
    """``(hook_name, hook_layer, model_name)``: the hookpoint is the folder name (``layers.N`` ->
    ``blocks.N.hook_resid_post``), the model the ``model`` of the run's ``config.json`` one folder up."""
    hookpoint = folder.name
    layer = _layer_of(hookpoint)
    hook = f"blocks.{layer}.hook_resid_post" if re.fullmatch(r"(?:model\.)?layers[._]\d+", hookpoint) else None
    conv.append(f"hookpoint {hookpoint!r} (folder name)" + (f" = {hook}" if hook else ""))
    model = None
    run_cfg = folder.parent / DL_CONFIG
    if run_cfg.is_file():
        try:
            rc = json.loads(run_cfg.read_text(encoding="utf-8"))
            model = rc.get("model") if isinstance(rc, dict) and isinstance(rc.get("model"), str) else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            conv.append("run config.json one folder up is not valid JSON; ignored")
    return hook, layer, model


def load_sparsify(path: str | Path) -> LoadedTeacher:
    """Load an EleutherAI sparsify coder folder (``SparseCoder.save_to_disk``: ``cfg.json`` + ``sae.safetensors``).

    sparsify's forward (``SparseCoder.encode`` / ``decode``, ``fused_encoder``): h = relu((x - b_dec) @
    encoder.weight.T + encoder.bias), keep each token's top ``k`` (``cfg.json`` ``k``), x_hat = sum of
    ``W_dec[j] * z_j`` + b_dec. Mapped to :class:`TopKSAE` with W_enc = encoder.weight.T (the nn.Linear
    weight is [d_sae, d_in]), W_dec [d_sae, d_in] (a transposed [d_in, d_sae] W_dec is detected by shape and
    transposed back), apply_b_dec_to_input=True. d_sae = ``num_latents`` or ``d_in * expansion_factor``. The
    hookpoint (e.g. ``layers.3``: the output of decoder layer 3, i.e. ``blocks.3.hook_resid_post``) is the
    folder name; the model name comes from the run's ``config.json`` one folder up, when present.

    Raises:
        TeacherError: transcoders, skip connections, ``groupmax`` / signed activations, a coder saved without
            decoder, wrong shapes, non-finite values, bad k.
    """
    folder = Path(path)
    cfg = _read_json(folder / CFG_NAME, "cfg.json")
    d_in = _dim(cfg.get("d_in"), "cfg.json.d_in")
    _sparsify_check_supported(cfg)
    d_sae, conv = _sparsify_d_sae(cfg, d_in)
    k = _k(cfg.get("k", 32), d_sae, "cfg.json.k")
    conv += [
        f"k={k} from cfg.json",
        "apply_b_dec_to_input=True (sparsify encodes x - b_dec)",
        "TopK of relu(h) (sparsify) = ReLU of the top-k of h (same latents and values)",
        "W_enc = encoder.weight.T (nn.Linear weight [d_sae, d_in])",
    ]
    raw = _read_safetensors(folder / SPARSIFY_WEIGHTS, SPARSIFY_WEIGHTS)
    t = _sparsify_tensors(raw, d_in, d_sae, conv)
    hook, layer, model = _sparsify_hook(folder, conv)
    files = _files(folder, [CFG_NAME, SPARSIFY_WEIGHTS])
    det = DetectedFormat(
        "sparsify", "topk", "SparseCoder", d_in, d_sae, True, conv, k, hook, layer, model, files, str(folder)
    )
    sae = _build("topk", d_in, d_sae, t, apply_b_dec=True, k=k, metadata=_metadata({}, det))
    return LoadedTeacher(sae, det)


# -- dictionary_learning ---------------------------------------------------------------------------------------

_DL_CLASSES = (
    "AutoEncoder",
    "AutoEncoderNew",
    "JumpReluAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
)


@dataclass
class _DLParts:
    """What an ``ae.pt`` holds, validated: the project's gate family, b_dec handling, widths, float32 tensors
    (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]), k and threshold [d_sae]."""

    family: str
    apply_b_dec: bool
    d_in: int
    d_sae: int
    tensors: dict[str, torch.Tensor]
    k: int | None = None
    threshold: torch.Tensor | None = None


def _dl_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """``ae.pt`` read with ``torch.load(weights_only=True)`` (names -> tensors); TeacherError(``ae.pt``) if
    missing, holding pickled objects, unreadable, or not a flat state dict of tensors."""
    fpath = folder / DL_WEIGHTS
    if not fpath.is_file():
        raise TeacherError(f"missing {DL_WEIGHTS} in {folder}", field=DL_WEIGHTS)
    try:
        sd = torch.load(fpath, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TeacherError(
            "ae.pt refused: it holds pickled Python objects beyond tensors and plain containers "
            f"(torch.load weights_only=True): {str(e).splitlines()[0]}",
            field=DL_WEIGHTS,
        ) from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: the weights-only unpickler raises IndexError,
        # KeyError, TypeError, ... on garbage (seen: "pop from empty list"), besides the usual file errors
        _raise_if_out_of_memory(e)
        raise TeacherError(f"ae.pt is not a readable torch file: {type(e).__name__}: {e}", field=DL_WEIGHTS) from None
    if not isinstance(sd, dict) or not all(isinstance(k_, str) and isinstance(v, torch.Tensor) for k_, v in sd.items()):
        raise TeacherError("ae.pt must hold a state dict (names -> tensors)", field=DL_WEIGHTS)
    return sd


def _dl_trainer(folder: Path, conv: list[str]) -> dict[str, Any]:
    """The ``trainer`` object of ``config.json`` ({} when the file or the object is absent);
    TeacherError(``config.json``) if the file is not a JSON object."""
    conf: dict[str, Any] = {}
    if (folder / DL_CONFIG).is_file():
        conf = _read_json(folder / DL_CONFIG, DL_CONFIG)
    trainer = conf.get("trainer") if isinstance(conf.get("trainer"), dict) else {}
    if conf and not trainer:
        conv.append("config.json has no 'trainer' object; class detected from ae.pt keys")
    return trainer


def _dl_class_from_keys(keys: set[str]) -> str:
    """The dictionary_learning class implied by the ``ae.pt`` keys alone; TeacherError(``config.json``) for a
    top-k dictionary (class ambiguous), (``ae.pt``) for keys matching no supported class."""
    if {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} <= keys and "k" not in keys:
        return "JumpReluAutoEncoder"
    if {"encoder.weight", "encoder.bias", "decoder.weight", "bias"} <= keys:
        return "AutoEncoder"
    if {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"} <= keys:
        return "AutoEncoderNew"
    if "k" in keys:
        raise TeacherError(
            "ae.pt holds a top-k dictionary ('k' buffer) but without config.json its class is "
            "ambiguous: AutoEncoderTopK keeps each token's top k, BatchTopKSAE applies a global "
            "threshold at inference. Upload config.json (trainer.dict_class)",
            field=DL_CONFIG,
        )
    raise TeacherError(
        f"ae.pt keys {sorted(keys)} match no supported dictionary_learning class {list(_DL_CLASSES)}", field=DL_WEIGHTS
    )


def _dl_class(trainer: dict[str, Any], sd: dict[str, torch.Tensor], conv: list[str]) -> str:
    """``trainer.dict_class``, else the class detected from the ``ae.pt`` keys; TeacherError
    (``config.json.trainer.dict_class``) for a class not in :data:`_DL_CLASSES`."""
    cls = trainer.get("dict_class")
    if cls is None:
        cls = _dl_class_from_keys(set(sd))
        conv.append(f"dict_class {cls} detected from ae.pt keys")
    else:
        conv.append(f"dict_class {cls} from config.json")
    if cls not in _DL_CLASSES:
        raise TeacherError(
            f"dictionary_learning class {cls!r} is not supported; supported: {list(_DL_CLASSES)}",
            field=f"{DL_CONFIG}.trainer.dict_class",
        )
    return cls


def _dl_need(sd: dict[str, torch.Tensor], cls: str, *names: str) -> None:
    """TeacherError(``ae.pt.<name>``) for the first of ``names`` missing from the state dict."""
    for n in names:
        if n not in sd:
            raise TeacherError(f"tensor '{n}' missing from ae.pt (needed by {cls})", field=DL_WEIGHTS + "." + n)


def _dl_jumprelu(sd: dict[str, torch.Tensor], conv: list[str]) -> _DLParts:
    """``JumpReluAutoEncoder``: W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold [d_sae] (<= 0 raised), no b_dec
    subtraction; TeacherError(``ae.pt.<name>``) for a missing, misshapen or non-finite tensor."""
    f = DL_WEIGHTS + "."
    _dl_need(sd, "JumpReluAutoEncoder", "W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    if sd["W_enc"].ndim != 2:
        raise TeacherError("W_enc must be 2-D [d_in, d_sae]", field=f + "W_enc")
    d_in, d_sae = (_dim(int(s), f + "W_enc") for s in sd["W_enc"].shape)
    t = {
        "W_enc": _tensor(sd["W_enc"], (d_in, d_sae), f + "W_enc"),
        "b_enc": _tensor(sd["b_enc"], (d_sae,), f + "b_enc"),
        "W_dec": _tensor(sd["W_dec"], (d_sae, d_in), f + "W_dec"),
        "b_dec": _tensor(sd["b_dec"], (d_in,), f + "b_dec"),
    }
    conv.append("apply_b_dec_to_input=False (JumpReluAutoEncoder default; not stored in ae.pt)")
    threshold = _thresholds(_tensor(sd["threshold"], (d_sae,), f + "threshold"), conv)
    return _DLParts("jumprelu", False, d_in, d_sae, t, threshold=threshold)


def _dl_linear(sd: dict[str, torch.Tensor], cls: str, trainer: dict[str, Any], conv: list[str]) -> _DLParts:
    """The ``nn.Linear``-style classes: W_enc = encoder.weight.T [d_in, d_sae], b_enc = encoder.bias [d_sae],
    W_dec = decoder.weight.T [d_sae, d_in], then the class's b_dec and gate; TeacherError(``ae.pt.<name>``)."""
    f = DL_WEIGHTS + "."
    _dl_need(sd, cls, "encoder.weight", "encoder.bias", "decoder.weight")
    if sd["encoder.weight"].ndim != 2:
        raise TeacherError("encoder.weight must be 2-D [d_sae, d_in]", field=f + "encoder.weight")
    d_sae, d_in = (_dim(int(s), f + "encoder.weight") for s in sd["encoder.weight"].shape)
    conv.append("W_enc = encoder.weight.T, W_dec = decoder.weight.T (nn.Linear weights)")
    t = {
        "W_enc": _tensor(sd["encoder.weight"], (d_sae, d_in), f + "encoder.weight").T.contiguous(),
        "b_enc": _tensor(sd["encoder.bias"], (d_sae,), f + "encoder.bias"),
        "W_dec": _tensor(sd["decoder.weight"], (d_in, d_sae), f + "decoder.weight").T.contiguous(),
    }
    if cls == "AutoEncoder":
        _dl_need(sd, cls, "bias")
        t["b_dec"] = _tensor(sd["bias"], (d_in,), f + "bias")
        conv.append("b_dec = 'bias', subtracted before encoding")
        return _DLParts("relu", True, d_in, d_sae, t)
    if cls == "AutoEncoderNew":
        _dl_need(sd, cls, "decoder.bias")
        t["b_dec"] = _tensor(sd["decoder.bias"], (d_in,), f + "decoder.bias")
        conv.append("b_dec = decoder.bias, not subtracted before encoding")
        return _DLParts("relu", False, d_in, d_sae, t)
    t["b_dec"], k = _dl_topk_b_dec_and_k(sd, cls, trainer, d_in, d_sae, conv)
    if cls == "AutoEncoderTopK":
        return _DLParts("topk", True, d_in, d_sae, t, k)
    family, threshold = _dl_batch_topk_gate(sd, cls, d_sae, conv)
    return _DLParts(family, True, d_in, d_sae, t, k, threshold)


def _dl_topk_b_dec_and_k(
    sd: dict[str, torch.Tensor], cls: str, trainer: dict[str, Any], d_in: int, d_sae: int, conv: list[str]
) -> tuple[torch.Tensor, int]:
    """Top-k classes: ``(b_dec [d_in], k)`` with k the ``k`` buffer; TeacherError(``ae.pt.<name>``) for a bad
    tensor or k, (``config.json.trainer.k``) when the config's k is bad or disagrees."""
    f = DL_WEIGHTS + "."
    _dl_need(sd, cls, "b_dec", "k")
    b_dec = _tensor(sd["b_dec"], (d_in,), f + "b_dec")
    k = _k(sd["k"], d_sae, f + "k")
    if trainer.get("k") is not None and _k(trainer["k"], d_sae, f"{DL_CONFIG}.trainer.k") != k:
        raise TeacherError(
            f"config.json k={trainer['k']} disagrees with ae.pt's k buffer {k}", field=f"{DL_CONFIG}.trainer.k"
        )
    conv.append(f"k={k} from the 'k' buffer in ae.pt; b_dec subtracted before encoding")
    return b_dec, k


def _dl_batch_topk_gate(
    sd: dict[str, torch.Tensor], cls: str, d_sae: int, conv: list[str]
) -> tuple[str, torch.Tensor | None]:
    """(Matryoshka)BatchTopKSAE inference gate from its scalar ``threshold``: ``("jumprelu", [d_sae] filled
    with it)`` when > 0, else ``("relu", None)``; TeacherError(``ae.pt.threshold``) if missing or non-finite."""
    _dl_need(sd, cls, "threshold")
    th = _tensor(sd["threshold"].reshape(()), (), DL_WEIGHTS + ".threshold").item()
    if th > 0:
        conv.append(
            f"{cls} inference gate relu(h) * 1[relu(h) > {th:.6g}]: JumpReLU with that "
            "threshold for every latent (batch top-k is a training-time rule)"
        )
        return "jumprelu", torch.full((d_sae,), th)
    conv.append(f"{cls} threshold {th:.6g} <= 0 (never set): its inference gate is relu(h)")
    return "relu", None


def _dl_check_config(trainer: dict[str, Any], d_in: int, d_sae: int, conv: list[str]) -> None:
    """Cross-check ``trainer.activation_dim`` / ``dict_size`` against ae.pt (TeacherError
    ``config.json.trainer.<key>`` on disagreement); note a ``norm_factor`` folded into the biases."""
    for key, want in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(key) is not None and trainer[key] != want:
            raise TeacherError(
                f"config.json trainer.{key}={trainer[key]} disagrees with ae.pt ({want})",
                field=f"{DL_CONFIG}.trainer.{key}",
            )
    if "norm_factor" in trainer:
        conv.append(
            f"norm_factor={trainer['norm_factor']} folded into the biases at save time "
            "(dictionary_learning scale_biases): ae.pt works on raw activations"
        )


def _dl_hook(trainer: dict[str, Any], conv: list[str]) -> tuple[str | None, int | None, str | None]:
    """``(hook_name, hook_layer, model_name)`` from ``trainer.layer`` (residual stream assumed, as SAELens's
    dictionary_learning loader does) and ``trainer.lm_name``; None where absent or not int / str."""
    layer = trainer.get("layer") if isinstance(trainer.get("layer"), int) else None
    sub = trainer.get("submodule_name")
    hook = None
    if layer is not None:
        hook = f"blocks.{layer}.hook_resid_post"
        conv.append(
            f"hook {hook} from trainer.layer={layer} (submodule {sub!r}; residual stream assumed, "
            "as SAELens's dictionary_learning loader does)"
        )
    model = trainer.get("lm_name") if isinstance(trainer.get("lm_name"), str) else None
    return hook, layer, model


def load_dictionary_learning(path: str | Path) -> LoadedTeacher:
    """Load a dictionary_learning folder: ``ae.pt`` (a state dict, ``torch.load(weights_only=True)``) and
    ``config.json`` (``{"trainer": {"dict_class", "activation_dim", "dict_size", "k", "layer", "lm_name",
    "submodule_name", ...}, "buffer": {...}}``, as ``dictionary_learning.training.trainSAE`` writes it).

    Classes (saprmarks/dictionary_learning ``dictionary.py`` and ``trainers/*.py``):

    - ``AutoEncoder``: z = relu(encoder(x - bias)), x_hat = decoder(z) + bias -> ReLU, W_enc =
      encoder.weight.T, W_dec = decoder.weight.T, b_dec = bias, b_dec subtracted.
    - ``AutoEncoderNew``: z = relu(encoder(x)), x_hat = decoder(z) -> ReLU, b_dec = decoder.bias, not subtracted.
    - ``JumpReluAutoEncoder``: W_enc, b_enc, W_dec, b_dec, threshold; z = relu(h * 1[h > threshold]), no b_dec
      subtraction (``apply_b_dec_to_input = False``, an attribute that ae.pt does not store).
    - ``AutoEncoderTopK``: z = top-k of relu(encoder(x - b_dec)) with k the ``k`` buffer -> TopK.
    - ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: inference z = relu(h) * 1[relu(h) > threshold] with one
      scalar threshold -> JumpReLU with that threshold for every latent (ReLU when it is <= 0, i.e. never set).

    Activation normalisation of ``trainSAE(normalize_activations=True)`` is folded into the saved biases
    (``scale_biases``), so ae.pt works on raw activations; noted when the config records ``norm_factor``.

    Raises:
        TeacherError: ae.pt holding pickled objects (refused by ``weights_only=True``), not a state dict,
            unknown or ambiguous class, wrong shapes, non-finite values, k disagreeing with the config.
    """
    folder = Path(path)
    sd = _dl_state_dict(folder)
    conv: list[str] = []
    trainer = _dl_trainer(folder, conv)
    cls = _dl_class(trainer, sd, conv)
    p = _dl_jumprelu(sd, conv) if cls == "JumpReluAutoEncoder" else _dl_linear(sd, cls, trainer, conv)
    _dl_check_config(trainer, p.d_in, p.d_sae, conv)
    hook, layer, model = _dl_hook(trainer, conv)
    det = DetectedFormat(
        "dictionary_learning",
        p.family,
        cls,
        p.d_in,
        p.d_sae,
        p.apply_b_dec,
        conv,
        p.k,
        hook,
        layer,
        model,
        _files(folder, [DL_WEIGHTS, DL_CONFIG]),
        str(folder),
    )
    sae = _build(
        p.family,
        p.d_in,
        p.d_sae,
        p.tensors,
        apply_b_dec=p.apply_b_dec,
        k=p.k,
        threshold=p.threshold,
        metadata=_metadata({}, det),
    )
    return LoadedTeacher(sae, det)


# -- entry points ----------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path], LoadedTeacher]] = {
    "saelens": load_saelens,
    "gemma_scope": load_gemma_scope,
    "sparsify": load_sparsify,
    "dictionary_learning": load_dictionary_learning,
}


def _metadata(meta: dict[str, Any], det: DetectedFormat) -> dict[str, Any]:
    """The teacher's metadata: the source cfg's own metadata, the hook fields when known, and ``source``
    (the detection report; a folder written by :func:`import_teacher` keeps the original one)."""
    out = dict(meta)
    for key in ("model_name", "hook_name", "hook_layer"):
        if getattr(det, key) is not None:
            out.setdefault(key, getattr(det, key))
    out.setdefault("source", det.to_dict())  # a re-loaded imported teacher keeps its original report
    return out


def teacher_hook_name(path: str | Path) -> str | None:
    """The hook site a teacher folder in the SAELens layout records (``metadata.hook_name``, pre-6.0
    ``hook_name`` / ``hook_point``), read from ``cfg.json`` alone (no tensors); None when the folder is in
    another layout, names no hook, or its cfg cannot be read (the pipeline reads it again and reports errors).
    """
    f = Path(path) / CFG_NAME
    try:
        cfg = _read_json(f, "cfg.json")
    except TeacherError:
        return None
    return _saelens_hook(cfg)[1]


def load_teacher(
    path: str | Path,
    *,
    format: str | None = None,
    hookpoint: str | None = None,
    norm_scaling_factor: float | None = None,
) -> LoadedTeacher:
    """Detect the format of a teacher folder and load it (see the module docstring for the four formats).

    Args:
        path: folder (or a file in it).
        format: force one of :data:`FORMATS` instead of detecting it.
        hookpoint: sub-folder of a sparsify run folder (one coder per hookpoint).
        norm_scaling_factor: a SAELens release's ``norm_scaling_factor`` (``pretrained_saes.yaml``), folded
            into a SAELens teacher whose cfg says ``expected_average_only_in`` (:func:`load_saelens`).

    Returns:
        :class:`LoadedTeacher`: ``sae`` (ReLUSAE / JumpReLUSAE / TopKSAE; encode: x [..., d_in] ->
        z [..., d_sae] with exact zeros; decode: z -> x_hat [..., d_in]; CPU, float32, eval mode; its
        ``metadata["source"]`` is the detection report) and ``detected`` (:class:`DetectedFormat`).

    Raises:
        TeacherError: see :func:`detect_format` and the per-format loaders; ``field="format"`` for an
            unknown forced format.
    """
    fmt, folder = detect_format(path, hookpoint=hookpoint)
    if format is not None:
        if format not in _LOADERS:
            raise TeacherError(f"unknown teacher format {format!r}; known: {list(FORMATS)}", field="format")
        fmt = format
    if fmt == "saelens" and norm_scaling_factor is not None:
        return load_saelens(folder, norm_scaling_factor=norm_scaling_factor)
    return _LOADERS[fmt](folder)


def import_teacher(
    path: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    hookpoint: str | None = None,
    norm_scaling_factor: float | None = None,
) -> DetectedFormat:
    """Load a teacher in any supported format and save it in the project's SAELens layout at ``out``
    (``cfg.json`` + ``sae_weights.safetensors``, read by :func:`rsae.saes.load_sae` and the pipeline).

    The saved cfg's ``metadata.source`` records the original format, conventions and file sha256s.

    Returns:
        The :class:`DetectedFormat` of the source.

    Raises:
        TeacherError: as :func:`load_teacher`.
    """
    t = load_teacher(path, format=format, hookpoint=hookpoint, norm_scaling_factor=norm_scaling_factor)
    t.sae.save(out)
    return t.detected


def provenance(teacher_path: str | Path) -> dict[str, Any]:
    """Teacher provenance for an upgraded SAE's cfg and report (cheap: no tensors are loaded).

    Args:
        teacher_path: the teacher folder the upgrade read (any supported format).

    Returns:
        ``{"source": str(path), "format": ..., "files": {name: sha256}, "original": <the detection report
        of the file the teacher was imported from, when it was converted by import_teacher, else None>,
        "versions": :func:`rsae.versions.package_versions`}``.

    Raises:
        TeacherError: the path holds no recognised teacher files.
    """
    fmt, folder = detect_format(teacher_path)
    names = {
        "saelens": [CFG_NAME, WEIGHTS_NAME],
        "sparsify": [CFG_NAME, SPARSIFY_WEIGHTS],
        "gemma_scope": [GEMMA_SCOPE_PARAMS],
        "dictionary_learning": [DL_WEIGHTS, DL_CONFIG],
    }[fmt]
    original = None
    if fmt == "saelens":
        try:
            meta = json.loads((folder / CFG_NAME).read_text(encoding="utf-8")).get("metadata") or {}
            original = meta.get("source") if isinstance(meta, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
            original = None
    return {
        "source": str(teacher_path),
        "format": fmt,
        "files": _files(folder, names),
        "original": original,
        "versions": package_versions(),
    }
