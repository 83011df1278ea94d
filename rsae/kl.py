"""The downstream-aware fine-tuning term: KL between the host model's clean and spliced next-token distributions.

``finetune.objective = "mse+kl"`` adds ``beta * KL`` to the RSAE's objective and to the control's alike, where

    KL = mean over predicted tokens of sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)),

p_spliced being the host model's next-token distribution with the activations at the SAE's site replaced by the
SAE's reconstruction (positions 1: of each sequence, as the evaluation splices: :class:`rsae.hooks.HookSplice`),
and p_clean the unmodified model's. This is the KL term of end-to-end SAE training (D. Braun, J. Taylor,
N. Goldowsky-Dill and L. Sharkey, "Identifying Functionally Important Features with End-to-End Sparse
Dictionary Learning", NeurIPS 2024) and of KL fine-tuning of a trained SAE (arXiv 2503.17272); the host model is
frozen, the gradient reaches only the SAE. Each step draws ``sequences`` training sequences (seeded; the RSAE
and the control draw the same ones) and runs one clean forward without gradient and one spliced forward with it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .hooknames import HookSite
from .hooks import HookSplice
from .saes import SAE, sae_loss
from .saes.family import LossFn


def spliced_kl(model, splice: HookSplice, sae: SAE, input_ids: torch.Tensor) -> torch.Tensor:
    """KL(clean || spliced) in nats per predicted token (0-dim tensor, differentiable w.r.t. ``sae``'s
    parameters), over ``input_ids`` [b, T] (positions 1 .. T-2 predict tokens 2 .. T-1, as the evaluation's
    CE). ``splice`` is registered on ``model`` at the SAE's site; it is left with ``fn = None``."""

    def logp() -> torch.Tensor:  # at least float32 (a bfloat16 host model), float64 kept
        logits = model(input_ids=input_ids, use_cache=False).logits[:, 1:-1, :]
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    try:
        splice.fn = None
        with torch.no_grad():
            clean = logp()
        splice.fn = sae
        spliced = logp()
    finally:
        splice.fn = None
    return (clean.exp() * (clean - spliced)).sum(-1).mean()


class KLTerm:
    """Draws ``sequences`` rows of ``input_ids`` [S, T] per call (seeded generator) and returns
    :func:`spliced_kl` on them. The host model's parameters are frozen (``requires_grad`` False) for the
    term's life; :meth:`close` unregisters the splice hook.

    Args:
        model: the host causal LM (eval mode; on the SAE's device).
        site: the SAE's resolved hook site.
        input_ids: training sequences [S, T] (token ids, CPU or the model's device).
        sequences: sequences per call; seed: the generator's seed (the RSAE and its control use the same).
    """

    def __init__(self, model, site: HookSite, input_ids: torch.Tensor, *, sequences: int, seed: int) -> None:
        self.model, self.input_ids, self.sequences = model, input_ids, int(sequences)
        self.device = next(model.parameters()).device
        for p in model.parameters():
            p.requires_grad_(False)
        self.splice = HookSplice(model, site)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, sae: SAE) -> torch.Tensor:
        """KL on the next ``sequences`` randomly drawn training sequences (0-dim tensor, nats/token)."""
        idx = torch.randint(0, self.input_ids.shape[0], (self.sequences,), generator=self.gen)
        return spliced_kl(self.model, self.splice, sae, self.input_ids[idx].to(self.device))

    def close(self) -> None:
        """Unregister the splice hook (idempotent)."""
        self.splice.remove()


def with_kl(base: LossFn | None, term: Callable[[SAE], torch.Tensor], beta: float) -> LossFn:
    """``loss_fn(sae, x, lam)`` = ``base(sae, x, lam)`` (default :func:`rsae.saes.sae_loss`) + ``beta`` x
    ``term(sae)``; parts gain ``kl`` (nats/token) and ``loss`` includes the KL term."""
    base_fn = base or sae_loss

    def loss_fn(sae: SAE, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, parts = base_fn(sae, x, lam)
        kl = term(sae)
        loss = loss + beta * kl
        return loss, {**parts, "loss": loss.item(), "kl": kl.item()}

    return loss_fn
