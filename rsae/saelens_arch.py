"""The ``"rational"`` architecture for SAELens: load an upgraded SAE (RSAE) with ``sae_lens.SAE.load_from_disk``.

Importing this module registers :class:`RationalSAELens` / :class:`RationalSAELensConfig` under
``architecture: "rational"`` in SAELens 6's registry (``sae_lens.registry.register_sae_class``), so that

    import rsae.saelens_arch                      # noqa: F401  (registers "rational")
    from sae_lens import SAE
    sae = SAE.load_from_disk("path/to/upgraded")  # cfg.json + sae_weights.safetensors written by RationalSAE.save
    z = sae.encode(x)                              # x [..., d_in] -> z [..., d_sae], exact zeros
    x_hat = sae.decode(z)                          # [..., d_in]

gives the same outputs as ``rsae.RationalSAE.load(path)``: the pre-activations follow SAELens's own
``process_sae_in`` (dtype, hooks, ``b_dec`` subtracted when ``apply_b_dec_to_input``), and the gate is
:meth:`rsae.saes.rational.RationalSAE.gate` itself (the rational ``C_out s P(t) / (1 + |B(t)|)``, ``t = h / (C_in s)``,
exact zeros below the floor, per-token scales for TopK upgrades; Yin & Yu 2026, arXiv 2606.14990), run on a
:class:`rsae.saes.rational.RationalGate` whose tensors are loaded from the file. Hook points
(``hook_sae_acts_pre`` / ``hook_sae_acts_post`` / ``hook_sae_recons``) fire as in SAELens's own classes, so
``HookedSAETransformer`` and SAELens's analysis tools work unchanged. Inference only (no training class).

File tensors (``RationalSAE.extra_tensors``) and their module names here: ``rational_a`` -> ``gate_fn.a``,
``rational_b`` -> ``gate_fn.b``, ``log_c_in`` / ``log_c_out`` -> ``gate_fn.log_c_in`` / ``log_c_out``,
``gate_floor`` -> ``gate_fn.floor``, ``latent_scale`` (s) -> ``gate_fn.log_scale`` = log s; renamed back by
``save_model``, so a folder saved by SAELens loads in ``rsae`` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn

from .saes import RationalGate, RationalSAE
from .saes.rational import gate_tail

ARCHITECTURE = "rational"

_RENAME = {
    "rational_a": "gate_fn.a",
    "rational_b": "gate_fn.b",
    "log_c_in": "gate_fn.log_c_in",
    "log_c_out": "gate_fn.log_c_out",
    "gate_floor": "gate_fn.floor",
}


@dataclass
class RationalSAELensConfig(SAEConfig):
    """SAELens config of a Rational SAE: SAELens's ``SAEConfig`` fields plus ``rational``, the cfg.json block
    written by :meth:`rsae.saes.rational.RationalSAE.cfg_dict` (``p``, ``q``, ``train_scale``, ``topk_k``,
    ``jump``, ``anchor``, ``topk_cap``, teacher architecture, ...)."""

    rational: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def architecture(cls) -> str:
        """``"rational"``."""
        return ARCHITECTURE


class RationalSAELens(SAE[RationalSAELensConfig]):
    """Inference-only SAELens SAE with the rational gate of :class:`rsae.saes.rational.RationalSAE`.

    Parameters: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] and
    ``gate_fn`` (a :class:`rsae.saes.rational.RationalGate`: a [p + 1], b [q], log C_in, log C_out, floor,
    log_scale [d_sae]). encode: x [..., d_in] -> z [..., d_sae]; decode: z -> x_hat [..., d_in].
    """

    b_enc: nn.Parameter
    gate_fn: RationalGate

    def __init__(self, cfg: RationalSAELensConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)

    @property
    def rational_cfg(self) -> dict[str, Any]:
        """The cfg's ``rational`` block (read by :meth:`rsae.saes.rational.RationalSAE.gate`)."""
        return self.cfg.rational

    topk_k = RationalSAE.topk_k
    jump_anchor = RationalSAE.jump_anchor
    gate = RationalSAE.gate

    def initialize_weights(self) -> None:
        """W_enc, W_dec, b_dec from SAELens's base init, b_enc zeros, and a gate of degrees (p, q) from the cfg.

        Raises:
            ValueError: ``rational.p`` / ``rational.q`` missing or not integers in [0, 32].
        """
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        p, q = self.cfg.rational.get("p"), self.cfg.rational.get("q")
        for name, v in (("p", p), ("q", q)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 32:
                raise ValueError(f"cfg rational.{name} must be an integer in [0, 32], got {v!r}")
        self.gate_fn = RationalGate(
            p,
            q,
            d_sae=self.cfg.d_sae,
            train_scale=bool(self.cfg.rational.get("train_scale", False)),
            tail=gate_tail(self.cfg.rational),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents z [..., d_sae] of x [..., d_in]: h = process_sae_in(x) @ W_enc + b_enc, z = gate(h)."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(self.gate(hidden_pre))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [..., d_in] = z @ W_dec + b_dec (then SAELens's output hooks / reshaping)."""
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """File tensor names -> module names (in place); ``latent_scale`` s -> ``gate_fn.log_scale`` = log s."""
        for src, dst in _RENAME.items():
            if src in state_dict:
                state_dict[dst] = state_dict.pop(src)
        if "latent_scale" in state_dict:
            state_dict["gate_fn.log_scale"] = state_dict.pop("latent_scale").log()

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        """Module names -> file tensor names (in place), the inverse of :meth:`process_state_dict_for_loading`."""
        for src, dst in _RENAME.items():
            if dst in state_dict:
                state_dict[src] = state_dict.pop(dst).contiguous()
        if "gate_fn.log_scale" in state_dict:
            state_dict["latent_scale"] = state_dict.pop("gate_fn.log_scale").exp().contiguous()

    def fold_W_dec_norm(self) -> None:
        """Not supported: folding decoder norms would move every latent's scale and so the rational gate's
        argument (the gate is not positively homogeneous).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("fold_W_dec_norm would change a rational SAE's outputs")


def register() -> None:
    """Register ``"rational"`` in SAELens's architecture registry (idempotent)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, RationalSAELens, RationalSAELensConfig)


register()
