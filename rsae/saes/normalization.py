"""SAELens's ``normalize_activations``: fold an input normalisation into W_enc / b_enc / W_dec / b_dec, or refuse.

What SAELens 6.54 does with each value of ``cfg.normalize_activations`` (``sae_lens/saes/sae.py``,
``training/sae_trainer.py``, ``training/activation_scaler.py``, ``saes/temporal_sae.py``):

- ``"none"`` (also ``None``, and ``false`` in pre-6.0 cfgs): nothing.
- ``"expected_average_only_in"`` (``true`` in pre-6.0 cfgs; Anthropic's April 2024 update): training feeds
  ``x * s`` with ``s = sqrt(d_in) / E||x||`` estimated on the training data. At the end of ``SAETrainer.fit``
  SAELens folds ``s`` into the weights (``fold_activation_norm_scaling_factor``: ``W_enc *= s``, ``W_dec /= s``,
  ``b_dec /= s``) and sets the cfg to ``"none"``, so a final SAE saved by SAELens says ``"none"``. A folder whose
  cfg still says ``"expected_average_only_in"`` holds weights that expect *scaled* inputs (inference applies
  nothing: ``_setup_activation_normalization`` has no branch for it): a training checkpoint
  (``save_checkpoint``, with ``s`` in ``activation_scaler.json`` beside the weights), or a released SAE whose
  ``s`` is in SAELens's ``pretrained_saes.yaml`` (``norm_scaling_factor``; ``SAE.from_pretrained`` folds it).
- ``"covariance_whitening"``: training feeds ``(x - mean) @ M``; ``fit`` folds it (``fold_activation_whitening``)
  and sets ``"none"``; a checkpoint keeps ``mean``, ``matrix``, ``inverse_matrix`` in
  ``activation_whitening.safetensors``.
- ``"constant_scalar_rescale"`` (temporal SAEs' loader): ``x * activation_normalization_factor`` in, divided
  out after decoding: a constant, folded like ``s``.
- ``"constant_norm_rescale"`` (``x * sqrt(d_in) / ||x||`` per token) and ``"layer_norm"`` (per-token
  standardisation, undone on the output): the scale depends on each token, so no fixed weights reproduce
  them: refused.

Folding makes the SAE encode and reconstruct *raw* activations exactly as SAELens would after its own fold: the
pre-activations (so latents, thresholds, k) are unchanged, and the reconstruction is that of the scaled input
mapped back. Reported metrics (MSE, FVU, delta CE) need that. Tensors: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in]; whitening mean [d_in], matrix and inverse [d_in, d_in].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import TeacherError

FIELD = "cfg.json.normalize_activations"
SCALER_FILE = "activation_scaler.json"
"""SAELens's ``ACTIVATION_SCALER_CFG_FILENAME``: ``{"scaling_factor": s, ...}`` in a training checkpoint."""
WHITENING_FILE = "activation_whitening.safetensors"
"""SAELens's ``ACTIVATION_WHITENING_FILENAME``: ``mean``, ``matrix``, ``inverse_matrix`` in a checkpoint."""
FOLDABLE = ("expected_average_only_in", "constant_scalar_rescale", "covariance_whitening")
PER_TOKEN = ("constant_norm_rescale", "layer_norm")


@dataclass
class NormFold:
    """An input normalisation to fold: ``mode`` (the cfg's value), the scale ``scale`` (x -> x * scale) or the
    whitening ``whitening`` (``{"mean", "matrix", "inverse_matrix"}``), and ``source`` (where it was read)."""

    mode: str
    source: str
    scale: float | None = None
    whitening: dict[str, torch.Tensor] | None = None

    def record(self) -> dict[str, Any]:
        """JSON for ``metadata.activation_normalization`` of the folded SAE's ``cfg.json``."""
        out: dict[str, Any] = {"teacher_normalize_activations": self.mode, "folded": True, "source": self.source}
        if self.scale is not None:
            out["scaling_factor"] = self.scale
        return out

    def note(self) -> str:
        """One human-readable sentence of what was folded (for the import conventions and the report notes)."""
        what = (
            f"x * {self.scale:.6g}"
            if self.scale is not None
            else "the covariance whitening (x - mean) @ M (W_enc <- M W_enc, W_dec <- W_dec M^-1, "
            "b_dec <- b_dec M^-1 + mean)"
        )
        return (
            f"normalize_activations={self.mode!r}: the teacher's weights expect {what}; folded into W_enc, "
            f"b_dec, W_dec as SAELens does (from {self.source}), so the SAE reads raw activations "
            "and cfg.json now says 'none'"
        )


def _positive(v: Any, where: str) -> float:
    """``v`` as a finite float > 0, else TeacherError(:data:`FIELD`) naming ``where``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise TeacherError(f"{where} must be a finite number > 0, got {v!r}", field=FIELD)
    return float(v)


def _scaler_file(folder: Path | None) -> float | None:
    """``scaling_factor`` of a SAELens checkpoint's ``activation_scaler.json`` in ``folder``, else None."""
    f = folder / SCALER_FILE if folder is not None else None
    if f is None or not f.is_file():
        return None
    try:
        s = json.loads(f.read_text(encoding="utf-8")).get("scaling_factor")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise TeacherError(f"{SCALER_FILE} is not a JSON object: {e}", field=FIELD) from None
    return None if s is None else _positive(s, f"{SCALER_FILE} 'scaling_factor'")


def _scale_for(cfg: dict[str, Any], folder: Path | None, given: float | None) -> tuple[float, str] | None:
    """The scale ``s`` of ``expected_average_only_in`` and where it came from: ``given`` (the SAELens release's
    ``norm_scaling_factor``), the cfg's ``norm_scaling_factor`` (top level or metadata), else the checkpoint's
    ``activation_scaler.json``; None when none of them has it."""
    if given is not None:
        return _positive(given, "norm_scaling_factor"), "SAELens's pretrained_saes.yaml norm_scaling_factor"
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for where, d in (("cfg.json", cfg), ("cfg.json metadata", meta)):
        if d.get("norm_scaling_factor") is not None:
            return _positive(d["norm_scaling_factor"], f"{where} 'norm_scaling_factor'"), f"{where} norm_scaling_factor"
    s = _scaler_file(folder)
    return None if s is None else (s, f"{SCALER_FILE} (SAELens checkpoint)")


def _whitening(folder: Path | None, d_in: int) -> dict[str, torch.Tensor] | None:
    """``mean`` [d_in], ``matrix`` / ``inverse_matrix`` [d_in, d_in] (float64) of ``activation_whitening.safetensors``
    in ``folder``, else None; TeacherError(:data:`FIELD`) if unreadable, misshapen or non-finite."""
    f = folder / WHITENING_FILE if folder is not None else None
    if f is None or not f.is_file():
        return None
    try:
        t = load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TeacherError(f"{WHITENING_FILE} is not readable: {e}", field=FIELD) from None
    shapes = {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)}
    for k, shape in shapes.items():
        v = t.get(k)
        if v is None or tuple(v.shape) != shape or not v.is_floating_point() or not torch.isfinite(v).all():
            raise TeacherError(f"{WHITENING_FILE} needs a finite '{k}' of shape {list(shape)}", field=FIELD)
    return {k: t[k].to(torch.float64) for k in shapes}


def normalization_mode(cfg: dict[str, Any]) -> str:
    """``cfg.normalize_activations`` as SAELens reads it: a pre-6.0 bool becomes ``"expected_average_only_in"`` /
    ``"none"``, None ``"none"``; TeacherError(:data:`FIELD`) for a value that is not a string."""
    mode = cfg.get("normalize_activations", "none")
    if isinstance(mode, bool):
        return "expected_average_only_in" if mode else "none"
    if mode is None:
        return "none"
    if not isinstance(mode, str):
        raise TeacherError(f"normalize_activations must be a string, got {mode!r}", field=FIELD)
    return mode


def resolve_normalization(
    cfg: dict[str, Any], folder: str | Path | None = None, *, norm_scaling_factor: float | None = None
) -> NormFold | None:
    """What to fold for a teacher's ``cfg.json`` (SAELens 6 or pre-6.0 keys); None when it applies nothing.

    Args:
        cfg: the teacher's cfg dict (``normalize_activations``, ``d_in``, ``activation_normalization_factor``,
            ``norm_scaling_factor``).
        folder: the teacher folder (a SAELens checkpoint's ``activation_scaler.json`` /
            ``activation_whitening.safetensors``), or None.
        norm_scaling_factor: ``s`` from SAELens's release directory (``pretrained_saes.yaml``), when known.

    Raises:
        TeacherError(``cfg.json.normalize_activations``): a per-token normalisation (``constant_norm_rescale``,
            ``layer_norm``), an unknown value, or a foldable one whose factor / statistics are nowhere to be
            found (the weights expect scaled inputs and the scale is unknown), or invalid.
    """
    mode = normalization_mode(cfg)
    folder = Path(folder) if folder is not None else None
    if mode == "none":
        return None
    if mode in PER_TOKEN:
        raise TeacherError(
            f"normalize_activations={mode!r} rescales each token by its own norm / statistics at run time; no "
            "fixed W_enc, b_dec, W_dec reproduce it, so it cannot be folded (only 'none', "
            "'expected_average_only_in', 'constant_scalar_rescale' and 'covariance_whitening' can)",
            field=FIELD,
        )
    if mode == "expected_average_only_in":
        found = _scale_for(cfg, folder, norm_scaling_factor)
        if found is None:
            raise TeacherError(
                "normalize_activations='expected_average_only_in' and the weights were not folded (SAELens "
                "sets 'none' when it folds): they expect inputs scaled by sqrt(d_in) / E||x||, and that factor "
                f"is not in this folder: add it as 'norm_scaling_factor' to cfg.json, or include {SCALER_FILE} "
                "of the SAELens checkpoint, or give the SAELens release and sae_id",
                field=FIELD,
            )
        return NormFold(mode, found[1], scale=found[0])
    if mode == "constant_scalar_rescale":
        s = _positive(cfg.get("activation_normalization_factor"), "cfg.json 'activation_normalization_factor'")
        return NormFold(mode, "cfg.json activation_normalization_factor", scale=s)
    if mode == "covariance_whitening":
        w = _whitening(folder, int(cfg["d_in"]))
        if w is None:
            raise TeacherError(
                "normalize_activations='covariance_whitening' and the weights were not folded: they expect "
                f"whitened inputs, and the whitening is not here (include {WHITENING_FILE} of the SAELens "
                "checkpoint)",
                field=FIELD,
            )
        return NormFold(mode, f"{WHITENING_FILE} (SAELens checkpoint)", whitening=w)
    raise TeacherError(
        f"unknown normalize_activations={mode!r}; SAELens knows 'none', {', '.join(map(repr, FOLDABLE + PER_TOKEN))}",
        field=FIELD,
    )


@torch.no_grad()
def fold_normalization(
    tensors: dict[str, torch.Tensor], fold: NormFold, *, apply_b_dec_to_input: bool
) -> dict[str, torch.Tensor]:
    """``tensors`` with ``fold`` folded in (a new dict; other tensors passed through), as SAELens's
    ``fold_activation_norm_scaling_factor`` (W_enc * s, W_dec / s, b_dec / s; b_enc unchanged) or
    ``fold_activation_whitening`` (W_enc <- M W_enc; b_enc <- b_enc - mean M W_enc when b_dec is not
    subtracted from the input; W_dec <- W_dec M^-1; b_dec <- b_dec M^-1 + mean; computed in float64)."""
    W_enc, b_enc, W_dec, b_dec = (tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if fold.scale is not None:
        s = fold.scale
        new = {"W_enc": W_enc * s, "b_enc": b_enc, "W_dec": W_dec / s, "b_dec": b_dec / s}
    else:
        assert fold.whitening is not None
        mean, M, Minv = (fold.whitening[k] for k in ("mean", "matrix", "inverse_matrix"))
        We = M @ W_enc.double()
        be = b_enc.double() if apply_b_dec_to_input else b_enc.double() - mean @ We
        new = {"W_enc": We, "b_enc": be, "W_dec": W_dec.double() @ Minv, "b_dec": b_dec.double() @ Minv + mean}
    return {**tensors, **{k: v.to(tensors[k].dtype).contiguous() for k, v in new.items()}}
