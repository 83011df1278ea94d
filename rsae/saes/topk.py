"""TopK family (SAELens ``architecture: "topk"``; Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): per token keep the k largest pre-activations, then ReLU; all others exactly 0.

Training loss: MSE + AuxK / 32 (Gao et al. 2024, section A.2). The RSAE reproduces the gate with its jump
at each token's separating threshold tau_i (midpoint of its k-th and (k+1)-th pre-activation), the
teacher's own top-k rule capping the active set (``remez.topk_cap``, default), or with one global threshold
tau (``remez.topk_threshold = "global"``, BatchTopK-style; Bussmann et al. 2024), handled as a JumpReLU with
theta_j = tau.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TeacherError
from ..stats import quantile
from .base import SAE, decoder_norm_l1
from .family import Family, JumpRule, register_family

DEFAULT_K = 32
"""Default k of a TopK teacher trained by :mod:`rsae.teacher`."""


def top_values(h: torch.Tensor, k: int) -> torch.Tensor:
    """The min(k + 1, d_sae) largest pre-activations of each token, descending, detached. [..., min(k+1, d)]."""
    return h.detach().topk(min(k + 1, h.shape[-1]), dim=-1).values


TAU_MIN_RATIO = 1e-3
"""Lower bound of a token's separating threshold relative to its largest pre-activation. A token with fewer
than k + 1 positive pre-activations has a midpoint <= 0; its scale s = tau / c would then be ~0, t = h / s
would leave the fitted domain by orders of magnitude and P(t) would overflow float32 (the (9,8) coefficients
are ~1e6). With tau >= 1e-3 max(h), t <= 1e3 c; only entries below 0.1% of the token's largest are cut."""


def separating_threshold_from_top(top: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token separating threshold [..., 1] from ``top`` = :func:`top_values` (see
    :func:`topk_separating_threshold`)."""
    tau = 0.5 * (top[..., k - 1 : k] + top[..., -1:]) if top.shape[-1] > k else top[..., -1:]
    return torch.maximum(tau, TAU_MIN_RATIO * top[..., :1]).clamp_min(1e-6)


def topk_separating_threshold(h: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token separating threshold of a TopK gate, [..., 1]: the midpoint of each token's k-th and
    (k+1)-th largest pre-activation (the k-th itself when d_sae == k), at least :data:`TAU_MIN_RATIO` times
    the token's largest pre-activation and 1e-6. h: [..., d_sae].
    Detached: it is supplied to the rational gate, not learned."""
    return separating_threshold_from_top(top_values(h, k), k)


class TopKSAE(SAE):
    """TopK SAE (SAELens ``architecture: "topk"``; Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders"): per token keep the ``k`` largest pre-activations, then ReLU; all others exactly 0.

    The gate is not element-wise: its jump sits at each token's separating threshold
    (:func:`topk_separating_threshold`).
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
            raise TeacherError(
                f"cfg.json 'k' of a topk SAE must be an integer in [1, d_sae={cfg['d_sae']}], got {k!r}",
                field="cfg.json.k",
            )
        return super().from_parts(cfg, tensors, k=k)


class TopKLoss:
    """TopK objective MSE + AuxK / 32 (Gao et al. 2024, section A.2), with dead-latent tracking.

    Args:
        d_sae: latents. k_aux: latents used by AuxK (default min(512, d_sae // 2)).
        dead_tokens: a latent not active for this many training tokens counts as dead.
    """

    def __init__(
        self, d_sae: int, *, k_aux: int | None = None, dead_tokens: int = 100_000, aux_coefficient: float = 1 / 32
    ) -> None:
        self.k_aux = k_aux or min(512, d_sae // 2)
        self.dead_tokens = dead_tokens
        self.aux_coefficient = aux_coefficient
        self.since_fired = torch.zeros(d_sae)

    def __call__(self, sae: SAE, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on x [n, d_in]; ``lam`` (L1 coefficient) is applied too when > 0."""
        h = sae.pre_acts(x)
        z = sae.gate(h)
        x_hat = sae.decode(z)
        err = x - x_hat
        mse = err.pow(2).sum(-1).mean()
        fired = (z != 0).any(0).cpu()
        self.since_fired = torch.where(fired, torch.zeros_like(self.since_fired), self.since_fired + x.shape[0])
        dead = (self.since_fired >= self.dead_tokens).to(h.device)
        aux = torch.zeros((), device=x.device)
        n_dead = int(dead.sum())
        if n_dead > 0:
            hd = torch.where(dead, h, torch.full_like(h, -torch.inf))
            vals, idx = hd.topk(min(self.k_aux, n_dead), dim=-1)
            z_aux = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
            e_hat = z_aux @ sae.W_dec
            aux = (err.detach() - e_hat).pow(2).sum(-1).mean()
        l1 = decoder_norm_l1(z, sae.W_dec)
        loss = mse + self.aux_coefficient * aux + lam * l1
        return loss, {
            "loss": loss.item(),
            "mse": mse.item(),
            "l0": (z != 0).sum(-1).float().mean().item(),
            "l1": l1.item(),
            "aux": aux.item(),
            "dead": n_dead,
        }


class TopKFamily(Family):
    """The TopK family: per-token (or one global) jump; with the cap, no sparsity term in fine-tuning."""

    name = "topk"
    sae_class = TopKSAE
    degrees = (9, 8)
    default_coefficient = 0.0

    def jump_rule(self, teacher: SAE, h: torch.Tensor, remez: Any) -> JumpRule:
        """``remez.topk_threshold == "per_token"``: theta [n, 1] = each token's separating threshold, and the
        RSAE's gate keeps the rule (``rational.topk_k``, ``topk_cap``). ``"global"``: theta [d_sae] = tau, the
        (1 - k / d_sae) quantile of ``h`` [n, d_sae], for every latent (mean count above tau = k)."""
        k = teacher.k
        if remez.topk_threshold == "per_token":
            tau = topk_separating_threshold(h, k)
            info = {
                "rule": "per token: tau_i = midpoint of the token's k-th and (k+1)-th pre-activation",
                "mode": "per_token",
                "k": k,
                "tau_median": tau.median().item(),
            }
            cap = bool(remez.topk_cap)
            return JumpRule(tau, info, rational={"topk_k": k, "topk_cap": cap}, rank_capped=cap)
        tau = max(quantile(h, 1.0 - k / teacher.d_sae), 1e-6)
        return JumpRule(
            torch.full((teacher.d_sae,), tau, device=h.device),
            {
                "rule": "tau = (1 - k/d_sae) quantile of real pre-activations (mean count above tau = k)",
                "mode": "global",
                "tau": tau,
                "k": k,
            },
        )

    def notes(self, teacher: SAE, thresholds: dict[str, Any]) -> list[str]:
        """How the RSAE's jump follows the top-k rule."""
        if thresholds.get("mode") == "global":
            return [
                f"TopK teacher: the RSAE replaces per-token top-{teacher.k} by the threshold tau = "
                f"{thresholds['tau']:.4g}; its L0 varies per token (mean reported)."
            ]
        return [
            f"TopK teacher: the RSAE's jump sits at each token's separating threshold (midpoint of its "
            f"{teacher.k}-th and {teacher.k + 1}-th pre-activation); the rational shapes the values and "
            "the floor decides the entries inside the margin around the jump."
        ]

    def new_teacher(self, d_in: int, d_sae: int, *, k: int, coefficient: float, metadata: dict[str, Any]) -> SAE:
        """A TopK SAE with ``k`` active latents per token."""
        return TopKSAE(d_in, d_sae, k=k, metadata={**metadata, "k": k, "sparsity_penalty": "topk + auxk/32"})

    def train_teacher_objective(self, sae: SAE, batch_size: int):
        """:class:`TopKLoss` (latents dead for max(20 batches, 50,000 tokens) feed AuxK)."""
        return TopKLoss(sae.d_sae, dead_tokens=max(20 * batch_size, 50_000))


TOPK = register_family(TopKFamily())
"""The registered TopK family."""
