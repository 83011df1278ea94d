"""Sparse autoencoders in the SAELens layout: a small class per gate family, plus load/save.

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
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import TeacherError

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
MAX_DIM = 1 << 20  # d_in or d_sae above this is rejected as implausible


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

    def __init__(self, d_in: int, d_sae: int, *, apply_b_dec_to_input: bool = True,
                 metadata: dict[str, Any] | None = None) -> None:
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
        """The ``cfg.json`` content (SAELens 6 keys plus ``metadata``)."""
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "metadata": self.metadata,
        }

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Family-specific tensors saved beside W_enc, b_enc, W_dec, b_dec."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` to folder ``path`` atomically (temp + rename).

        Returns the folder path.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).detach().to("cpu", torch.float32).contiguous()
                   for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors.update({k: v.detach().to("cpu", torch.float32).contiguous()
                        for k, v in self.extra_tensors().items()})
        tmp_w = path / f".{WEIGHTS_NAME}.tmp"
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        os.replace(tmp_w, path / WEIGHTS_NAME)
        tmp_c = path / f".{CFG_NAME}.tmp"
        tmp_c.write_text(json.dumps(self.cfg_dict(), indent=2))
        os.replace(tmp_c, path / CFG_NAME)
        return path

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SAE":
        """Build from a validated cfg dict and tensor dict (see :func:`load_sae`)."""
        sae = cls(cfg["d_in"], cfg["d_sae"], apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
                  metadata=cfg.get("metadata") or {})
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, n).copy_(tensors[n])
        return sae

    @classmethod
    def load(cls, path: str | Path) -> "SAE":
        """Load a folder written by :meth:`save` (or SAELens) and check it is of this class."""
        sae = load_sae(path)
        if not isinstance(sae, cls):
            raise TeacherError(f"{path} holds a {type(sae).__name__}, not a {cls.__name__}",
                               field="architecture")
        return sae


class ReLUSAE(SAE):
    """Standard ReLU SAE (SAELens ``architecture: "standard"``): ``z = relu(h)``."""

    architecture = "standard"
    family = "relu"

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """``relu(h)``, [..., d_sae] -> [..., d_sae]."""
        return torch.relu(h)

    def jump_positions(self) -> torch.Tensor:
        """Per-latent jump position of the gate, [d_sae]: zeros (ReLU is continuous at 0)."""
        return torch.zeros(self.d_sae, device=self.W_enc.device)


class _JumpReLUFn(torch.autograd.Function):
    """z = h * H(h - theta) with the straight-through kernel estimator for theta.

    Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
    Autoencoders", eq. 11: dz/dh = H(h - theta); dz/dtheta = -(theta / eps) K((h - theta) / eps) with the
    rectangle kernel K(u) = 1[|u| < 1/2]. h: [..., d_sae], theta: [d_sae], eps: bandwidth in units of h.
    """

    @staticmethod
    def forward(ctx, h, theta, eps: float):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        gh = g * (h > theta)
        kern = ((h - theta).abs() < eps / 2).to(g.dtype)
        gt = -(theta / eps) * (g * kern)
        return gh, gt.reshape(-1, theta.shape[-1]).sum(0), None


class _StepFn(torch.autograd.Function):
    """H(h - theta) with the straight-through kernel estimator (Rajamanoharan et al. 2024, eq. 12):
    d/dh = 0; d/dtheta = -(1 / eps) K((h - theta) / eps). Used for the L0 penalty of JumpReLU training."""

    @staticmethod
    def forward(ctx, h, theta, eps: float):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        kern = ((h - theta).abs() < eps / 2).to(g.dtype)
        gt = -(1.0 / eps) * (g * kern)
        return None, gt.reshape(-1, theta.shape[-1]).sum(0), None


class JumpReLUSAE(SAE):
    """JumpReLU SAE (SAELens ``architecture: "jumprelu"``; Rajamanoharan et al. 2024; Gemma Scope):
    ``z_j = h_j * H(h_j - theta_j)`` with a per-latent threshold ``theta`` [d_sae] > 0.

    ``theta`` is stored as ``threshold`` in the weights file (SAELens layout) and trained as
    ``log_threshold`` so it stays positive. ``bandwidth`` (cfg ``jumprelu_bandwidth``, units of h) is the
    kernel width of the straight-through estimator used when training (:class:`_JumpReLUFn`).
    """

    architecture = "jumprelu"
    family = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, bandwidth: float = 0.05, **kw: Any) -> None:
        super().__init__(d_in, d_sae, **kw)
        self.bandwidth = float(bandwidth)
        self.log_threshold = nn.Parameter(torch.zeros(self.d_sae))

    @property
    def threshold(self) -> torch.Tensor:
        """theta = exp(log_threshold), [d_sae], units of h."""
        return self.log_threshold.exp()

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """``h * H(h - theta)`` [..., d_sae] -> [..., d_sae]; straight-through gradient for theta."""
        return _JumpReLUFn.apply(h, self.threshold, self.bandwidth)

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """``H(h - theta)`` [..., d_sae] with the straight-through gradient for theta (L0 penalty)."""
        return _StepFn.apply(h, self.threshold, self.bandwidth)

    def jump_positions(self) -> torch.Tensor:
        """Per-latent jump position of the gate, [d_sae] (= theta)."""
        return self.threshold.detach()

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens cfg plus ``jumprelu_bandwidth``."""
        return {**super().cfg_dict(), "jumprelu_bandwidth": self.bandwidth}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """``threshold`` [d_sae] (SAELens name)."""
        return {"threshold": self.threshold}

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "JumpReLUSAE":
        """Build from cfg + tensors; requires a finite, positive ``threshold`` [d_sae].

        Raises:
            TeacherError: missing, misshapen, non-finite or non-positive threshold; bad bandwidth.
        """
        th = tensors.get("threshold")
        if th is None or tuple(th.shape) != (cfg["d_sae"],) or not th.is_floating_point():
            raise TeacherError(f"a jumprelu SAE needs a float tensor 'threshold' of shape [{cfg['d_sae']}]",
                               field=f"{WEIGHTS_NAME}.threshold")
        if not torch.isfinite(th).all() or (th <= 0).any():
            raise TeacherError("tensor 'threshold' must be finite and > 0", field=f"{WEIGHTS_NAME}.threshold")
        bw = cfg.get("jumprelu_bandwidth", 0.05)
        if not is_finite_number(bw) or bw <= 0:
            raise TeacherError("cfg.json 'jumprelu_bandwidth' must be a positive number",
                               field="cfg.json.jumprelu_bandwidth")
        sae = cls(cfg["d_in"], cfg["d_sae"], bandwidth=float(bw),
                  apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True), metadata=cfg.get("metadata") or {})
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, n).copy_(tensors[n])
            sae.log_threshold.copy_(th.float().log())
        return sae


class TopKSAE(SAE):
    """TopK SAE (SAELens ``architecture: "topk"``; Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders"): per token keep the ``k`` largest pre-activations, then ReLU; all others exactly 0.

    The gate is not element-wise; :meth:`jump_positions` needs the separating threshold supplied by the
    caller (see :func:`rsae.stages` for how the upgrade chooses it).
    """

    architecture = "topk"
    family = "topk"

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, **kw: Any) -> None:
        super().__init__(d_in, d_sae, **kw)
        if not 1 <= int(k) <= self.d_sae:
            raise ValueError(f"k={k} must be in [1, d_sae={self.d_sae}]")
        self.k = int(k)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU of the per-token top-``k`` of ``h`` [..., d_sae]; exact zeros elsewhere."""
        vals, idx = h.topk(self.k, dim=-1)
        return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens cfg plus ``k``."""
        return {**super().cfg_dict(), "k": self.k}

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "TopKSAE":
        """Build from cfg + tensors; ``k`` must be an integer in [1, d_sae].

        Raises:
            TeacherError: missing or out-of-range ``k``.
        """
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg["d_sae"]:
            raise TeacherError(f"cfg.json 'k' of a topk SAE must be an integer in [1, d_sae={cfg['d_sae']}], "
                               f"got {k!r}", field="cfg.json.k")
        sae = cls(cfg["d_in"], cfg["d_sae"], k=k, apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
                  metadata=cfg.get("metadata") or {})
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, n).copy_(tensors[n])
        return sae


FAMILIES: tuple[str, ...] = ("relu", "jumprelu", "topk")
"""Teacher gate families the upgrade supports."""

SAE_REGISTRY: dict[str, type[SAE]] = {"standard": ReLUSAE, "relu": ReLUSAE, "jumprelu": JumpReLUSAE,
                                      "topk": TopKSAE}
"""``cfg.json`` ``architecture`` -> class. :mod:`rsae.rational` registers ``"rational"``."""


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
    if not isinstance(cfg, dict):
        raise TeacherError(f"{CFG_NAME} must be a JSON object", field="cfg.json")
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
            raise TeacherError(f"cfg.json '{key}' must be an integer in [1, {MAX_DIM}], got {v!r}",
                               field=f"cfg.json.{key}")
    arch = cfg.get("architecture", "standard")
    if not isinstance(arch, str) or arch not in SAE_REGISTRY:
        raise TeacherError(f"unknown architecture {arch!r}; known: {sorted(SAE_REGISTRY)}",
                           field="cfg.json.architecture")
    if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
        raise TeacherError("cfg.json 'apply_b_dec_to_input' must be a boolean",
                           field="cfg.json.apply_b_dec_to_input")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise TeacherError(f"normalize_activations={norm!r} is not supported yet (only 'none')",
                           field="cfg.json.normalize_activations")
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
        raise TeacherError(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}",
                           field=WEIGHTS_NAME) from None
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
            raise TeacherError(f"tensor '{name}' has dtype {t.dtype}; a floating dtype is required",
                               field=f"{WEIGHTS_NAME}.{name}")
        if tuple(t.shape) != shape:
            raise TeacherError(f"tensor '{name}' has shape {list(t.shape)}, cfg.json implies {list(shape)}",
                               field=f"{WEIGHTS_NAME}.{name}")
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

    Raises:
        TeacherError: missing/corrupt files, unknown architecture, wrong shapes or dtypes, NaN/Inf.
    """
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"SAE folder {path} does not exist", field="teacher")
    cfg = _read_cfg(path)
    tensors = validate_tensors(cfg, _read_tensors(path))
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


def decoder_norm_l1(z: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Sparsity penalty ``mean_tokens sum_j |z_j| * ||W_dec[j]||_2`` (scalar).

    Scale-invariant L1 of Anthropic's April 2024 update / SAELens ``scale_sparsity_penalty_by_decoder_norm``:
    shrinking z while growing W_dec does not lower it. z: [n, d_sae], W_dec: [d_sae, d_in].
    """
    return (z.abs() * W_dec.norm(dim=1)).sum(-1).mean()


def is_finite_number(x: Any) -> bool:
    """True for a real, finite int or float (not bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
