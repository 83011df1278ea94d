"""The SAE base class in the SAELens layout, plus load/save and the architecture registry.

Each gate family (:mod:`rsae.saes.relu`, :mod:`~rsae.saes.jumprelu`, :mod:`~rsae.saes.topk`,
:mod:`~rsae.saes.rational`) subclasses :class:`SAE` in its own module and registers its ``cfg.json``
architecture name here.

Layout (SAELens 6, ``sae_lens/saes/*.py``): a folder with ``cfg.json`` and ``sae_weights.safetensors``
holding ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] (plus
family-specific tensors). Encoding (SAELens "standard" SAE, Bricken et al. 2023, "Towards
Monosemanticity"):

    h = (x - b_dec) @ W_enc + b_enc        (b_dec subtracted only if cfg.apply_b_dec_to_input)
    z = gate(h)
    x_hat = z @ W_dec + b_dec

All tensors are float32 on load; activations ``x`` are [..., d_in], latents ``z`` are [..., d_sae].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TeacherError
from .normalization import fold_normalization, resolve_normalization

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
MAX_DIM = 1 << 20  # d_in or d_sae above this is rejected as implausible
CORE_TENSORS: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
"""The tensors every SAE has (SAELens names)."""


class SAE(nn.Module):
    """Base SAE: affine encoder, element-wise ``gate``, affine decoder.

    Args:
        d_in: width of the activations (e.g. 576 for SmolLM2-135M's residual stream).
        d_sae: number of latents.
        apply_b_dec_to_input: subtract ``b_dec`` from ``x`` before encoding (SAELens default True;
            Gemma Scope False).
        metadata: free-form provenance (host model, hook, training settings) saved in ``cfg.json``.
    """

    architecture: ClassVar[str] = "base"
    family: ClassVar[str] = "base"

    def __init__(
        self, d_in: int, d_sae: int, *, apply_b_dec_to_input: bool = True, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    # -- forward -----------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``h`` [..., d_sae] of activations ``x`` [..., d_in]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """Element-wise gate, [..., d_sae] -> [..., d_sae]. Subclasses define it."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``z`` [..., d_sae] of activations ``x`` [..., d_in]; inactive latents are exactly 0."""
        return self.gate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat`` [..., d_in] of latents ``z`` [..., d_sae]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``: [..., d_in] -> [..., d_in]."""
        return self.decode(self.encode(x))

    def param_groups_with(self, lr: float, *special: tuple[list[nn.Parameter], float]) -> list[dict[str, Any]]:
        """Adam parameter groups: every trainable parameter not in ``special`` at ``lr``, then one group per
        non-empty ``(params, lr)`` of ``special``, in that order."""
        ids = {id(p) for params, _ in special for p in params}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": r} for ps, r in special if ps]

    # -- init --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Tied init (W_enc = W_dec.T) with unit-norm decoder rows, as in Anthropic's April 2024 update."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w * 0.1)
        self.W_enc.copy_(w.T * 0.1)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- serialisation -----------------------------------------------------------------------------
    def cfg_dict(self) -> dict[str, Any]:
        """The ``cfg.json`` content (SAELens 6 keys plus ``metadata``). ``normalize_activations`` is always
        ``"none"`` (a teacher's normalisation is folded when it is read); ``reshape_activations`` is ``"hook_z"``
        when ``metadata.hook_name`` is an attention ``hook_z`` (SAELens then flattens [..., n_heads, d_head]
        inputs to [..., d_in] and unflattens the reconstruction), else ``"none"``."""
        hook = self.metadata.get("hook_name")
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "hook_z" if isinstance(hook, str) and hook.endswith("hook_z") else "none",
            "metadata": self.metadata,
        }

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Family-specific tensors saved beside W_enc, b_enc, W_dec, b_dec."""
        return {}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``sae_weights.safetensors``: :data:`CORE_TENSORS` plus :meth:`extra_tensors`, detached,
        float32, contiguous, on CPU (what :meth:`from_parts` reads back)."""
        tensors = {n: getattr(self, n) for n in CORE_TENSORS} | self.extra_tensors()
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` to folder ``path`` atomically (temp + rename).

        Returns the folder path.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex  # unique temp names: two writers of one folder never share a temp file
        tmp_w = path / f".{WEIGHTS_NAME}.{tag}.tmp"
        save_file(self.file_tensors(), str(tmp_w), metadata={"format": "pt"})
        os.replace(tmp_w, path / WEIGHTS_NAME)
        tmp_c = path / f".{CFG_NAME}.{tag}.tmp"
        tmp_c.write_text(json.dumps(self.cfg_dict(), indent=2))
        os.replace(tmp_c, path / CFG_NAME)
        return path

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], **kwargs: Any) -> "SAE":
        """Build from a validated cfg dict and tensor dict (see :func:`load_sae`); ``kwargs`` go to the
        constructor (family options such as ``k``). Subclasses validate and copy their own extra tensors."""
        sae = cls(
            cfg["d_in"],
            cfg["d_sae"],
            apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
            metadata=cfg.get("metadata") or {},
            **kwargs,
        )
        sae.copy_weights(tensors)
        return sae

    @torch.no_grad()
    def copy_weights(self, tensors: Any) -> None:
        """Copy ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` from ``tensors`` (a dict of tensors, or another
        :class:`SAE` of the same shapes) into this SAE, in place."""
        for n in CORE_TENSORS:
            getattr(self, n).copy_(tensors[n] if isinstance(tensors, dict) else getattr(tensors, n))

    @classmethod
    def load(cls, path: str | Path) -> "SAE":
        """Load a folder written by :meth:`save` (or SAELens) and check it is of this class."""
        sae = load_sae(path)
        if not isinstance(sae, cls):
            raise TeacherError(f"{path} holds a {type(sae).__name__}, not a {cls.__name__}", field="architecture")
        return sae


SAE_REGISTRY: dict[str, type[SAE]] = {}
"""``cfg.json`` ``architecture`` -> class; each module of :mod:`rsae.saes` registers its own."""


def register_architecture(name: str, cls: type[SAE]) -> None:
    """Register an SAE class under ``cfg.json`` architecture ``name``."""
    SAE_REGISTRY[name] = cls


def _read_cfg(path: Path) -> dict[str, Any]:
    f = path / CFG_NAME
    if not f.is_file():
        raise TeacherError(f"missing {CFG_NAME} in {path}", field="cfg.json")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TeacherError(f"{CFG_NAME} is not valid JSON: {e}", field="cfg.json") from None
    except RecursionError:  # nested past the interpreter's recursion limit
        raise TeacherError(f"{CFG_NAME} is nested too deeply to be a config", field="cfg.json") from None
    if not isinstance(cfg, dict):
        raise TeacherError(f"{CFG_NAME} must be a JSON object", field="cfg.json")
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
            raise TeacherError(
                f"cfg.json '{key}' must be an integer in [1, {MAX_DIM}], got {v!r}", field=f"cfg.json.{key}"
            )
    arch = cfg.get("architecture", "standard")
    if not isinstance(arch, str) or arch not in SAE_REGISTRY:
        raise TeacherError(
            f"unknown architecture {arch!r}; known: {sorted(SAE_REGISTRY)}", field="cfg.json.architecture"
        )
    if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
        raise TeacherError("cfg.json 'apply_b_dec_to_input' must be a boolean", field="cfg.json.apply_b_dec_to_input")
    if cfg.get("metadata") is not None and not isinstance(cfg["metadata"], dict):
        raise TeacherError("cfg.json 'metadata' must be an object", field="cfg.json.metadata")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    f = path / WEIGHTS_NAME
    if not f.is_file():
        raise TeacherError(f"missing {WEIGHTS_NAME} in {path}", field=WEIGHTS_NAME)
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TeacherError(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}", field=WEIGHTS_NAME) from None
    return tensors


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Required tensor names and shapes for ``cfg`` (d_in, d_sae)."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}


def validate_tensors(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check names, shapes, dtypes and finiteness; return float32 copies.

    Raises:
        TeacherError: with ``field`` naming the offending tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if name not in tensors:
            raise TeacherError(f"tensor '{name}' missing from {WEIGHTS_NAME}", field=f"{WEIGHTS_NAME}.{name}")
        t = tensors[name]
        if not t.is_floating_point():
            raise TeacherError(
                f"tensor '{name}' has dtype {t.dtype}; a floating dtype is required", field=f"{WEIGHTS_NAME}.{name}"
            )
        if tuple(t.shape) != shape:
            raise TeacherError(
                f"tensor '{name}' has shape {list(t.shape)}, cfg.json implies {list(shape)}",
                field=f"{WEIGHTS_NAME}.{name}",
            )
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise TeacherError(f"tensor '{name}' contains NaN or Inf", field=f"{WEIGHTS_NAME}.{name}")
        out[name] = t
    for name, t in tensors.items():
        if name not in out:
            out[name] = t.to(torch.float32) if t.is_floating_point() else t
    return out


def load_sae(path: str | Path) -> SAE:
    """Load an SAE folder (``cfg.json`` + ``sae_weights.safetensors``) into the class its cfg names.

    Args:
        path: folder in the SAELens layout.

    Returns:
        An :class:`SAE` subclass instance on CPU, float32, in eval mode.

    A cfg whose ``normalize_activations`` can be folded (SAELens's ``expected_average_only_in`` with a known
    factor, ``constant_scalar_rescale``, ``covariance_whitening`` with its statistics) is folded into the weights
    (:mod:`rsae.saes.normalization`) and recorded in ``metadata.activation_normalization``; the SAE then reads
    raw activations and saves ``normalize_activations: "none"``.

    Raises:
        TeacherError: missing/corrupt files, unknown architecture, wrong shapes or dtypes, NaN/Inf; a
            normalisation that cannot be folded (``cfg.json.normalize_activations``).
    """
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"SAE folder {path} does not exist", field="teacher")
    cfg = _read_cfg(path)
    fold = resolve_normalization(cfg, path)  # refused (per-token, factor unknown) before any tensor is read
    tensors = validate_tensors(cfg, _read_tensors(path))
    if fold is not None:
        tensors = fold_normalization(tensors, fold, apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True))
        cfg = {**cfg, "metadata": {**(cfg.get("metadata") or {}), "activation_normalization": fold.record()}}
    cls = SAE_REGISTRY[cfg.get("architecture", "standard")]
    sae = cls.from_parts(cfg, tensors)
    sae.eval()
    return sae


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def mse_l0_objective(
    sae: "SAE", x: torch.Tensor, z: torch.Tensor, l0: torch.Tensor, lam: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """``MSE + lam * l0`` for latents ``z`` [n, d_sae] of ``x`` [n, d_in], with ``l0`` the (straight-through) L0
    term already reduced to a scalar (Rajamanoharan et al. 2024, eq. 9). Returns (loss, parts) with parts loss,
    mse (sum over d_in, mean over rows), l0 (exact non-zeros of z per row) and l1 (decoder-norm weighted, reported
    only) as floats."""
    mse = (x - sae.decode(z)).pow(2).sum(-1).mean()
    loss = mse + lam * l0
    return loss, {
        "loss": loss.item(),
        "mse": mse.item(),
        "l0": (z != 0).sum(-1).float().mean().item(),
        "l1": decoder_norm_l1(z.detach(), sae.W_dec.detach()).item(),
    }


def decoder_norm_l1(z: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Sparsity penalty ``mean_tokens sum_j |z_j| * ||W_dec[j]||_2`` (scalar).

    Scale-invariant L1 of Anthropic's April 2024 update / SAELens ``scale_sparsity_penalty_by_decoder_norm``:
    shrinking z while growing W_dec does not lower it. z: [n, d_sae], W_dec: [d_sae, d_in].
    """
    return (z.abs() * W_dec.norm(dim=1)).sum(-1).mean()


def is_finite_number(x: Any) -> bool:
    """True for a real, finite int or float (not bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
