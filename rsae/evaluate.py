"""Evaluation on held-out tokens: reconstruction metrics and downstream (spliced) cross-entropy.

Definitions (``docs/method.md``; SAEBench / SAELens names):

- MSE: mean over tokens of sum over d_in of (x - x_hat)^2 (squared residual units per token).
- FVU: sum of squared errors / sum of squared deviations of x from its per-dimension mean, pooled over
  tokens and dimensions ("about the mean" convention; ``fvu_about_zero`` divides by sum x^2 instead).
  Explained variance = 1 - FVU.
- L0: mean number of exactly non-zero latents per token.
- alive fraction: share of latents non-zero on at least one evaluation token.
- CE clean / spliced / zero: next-token cross-entropy (nats/token) of the host model with the activations
  at the SAE's hook site (:mod:`rsae.hooks`) left alone / replaced by x_hat / replaced by zeros, at positions
  1..T-1 of each sequence
  (position 0 is left alone in all variants: it is the attention sink the SAE was not trained on). The
  loss is taken over the predictions made at positions 1..T-2 (targets 2..T-1), the ones the splice
  can change.
- delta CE = CE spliced - CE clean; loss recovered = (CE zero - CE spliced) / (CE zero - CE clean).
- KL: mean over the same positions of KL(p_clean || p_spliced), nats.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .hooknames import HookSite
from .hooks import HookSplice, site_for
from .saes import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """MSE, FVU (about the mean), FVU about zero, L0 and alive fraction over ``batches`` of x [n, d_in].

    Accumulates in float64, so memory is one batch. Returns floats plus ``n_tokens``.
    """
    sse = 0.0
    n = 0
    sum_x = None
    sum_x2 = 0.0
    l0_sum = 0.0
    alive = None
    for x in batches:
        x = x.to(next(sae.parameters()).device)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sse += (x - x_hat).double().pow(2).sum().item()
        xd = x.double()
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sum_x2 += xd.pow(2).sum().item()
        nz = z != 0
        l0_sum += nz.sum().item()
        a = nz.any(0)
        alive = a if alive is None else alive | a
        n += x.shape[0]
    if n == 0:
        raise ValueError("no evaluation tokens")
    sst = sum_x2 - (sum_x.pow(2).sum().item() / n)
    return {
        "mse": sse / n,
        "fvu": sse / sst,
        "fvu_about_zero": sse / sum_x2,
        "l0": l0_sum / n,
        "alive_fraction": alive.float().mean().item(),
        "n_tokens": n,
    }


@torch.no_grad()
def downstream_metrics(
    model,
    layer: int | None,
    saes: dict[str, SAE],
    input_ids: torch.Tensor,
    *,
    hook: str | HookSite | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, dict[str, float]]:
    """CE clean / zero and, per SAE, CE spliced, delta CE, loss recovered and KL.

    Args:
        model, layer, hook: the full host causal LM and the SAEs' site, where x_hat or zeros replace the
            activations (:func:`rsae.hooks.site_for`; ``hook`` None: ``blocks.{layer}.hook_resid_post``).
        saes, input_ids: name -> SAE, each evaluated in one pass over the held-out sequences [s, T].

    Returns:
        ``{"clean": {"ce": ..., "tokens": n}, "zero": {"ce": ...}, name: {"ce_spliced", "delta_ce",
        "delta_ce_se", "loss_recovered", "kl"}, ..., "paired": {"a-b": {"diff", "se"}}}`` (nats/token).
        ``delta_ce_se`` is the standard error of delta CE clustered by sequence (tokens of one sequence are
        correlated): std over sequences of the per-sequence mean of CE spliced - CE clean, / sqrt(#sequences).
        ``paired["a-b"]`` is delta CE of a minus delta CE of b on the same tokens, with the same clustered SE
        of the per-sequence differences, for every ordered pair of ``saes`` (a before b in ``saes``).
    """
    splice = HookSplice(model, site_for(model, layer, hook))
    names = ["clean", "zero", *saes]
    sums = {k: 0.0 for k in names}
    per_seq: dict[str, list[torch.Tensor]] = {k: [] for k in names}  # mean CE of each sequence
    kls = {k: 0.0 for k in saes}
    count = 0
    n_batches = (input_ids.shape[0] + batch_size - 1) // batch_size
    try:
        for bi, i in enumerate(range(0, input_ids.shape[0], batch_size)):
            ids = input_ids[i : i + batch_size].to(device)
            targets = ids[:, 2:]
            clean_logp = None
            for k in names:
                if k == "clean":
                    splice.fn = None
                elif k == "zero":
                    splice.fn = torch.zeros_like
                else:
                    splice.fn = saes[k]
                logits = model(input_ids=ids, use_cache=False).logits[:, 1:-1, :].float()
                logp = F.log_softmax(logits, dim=-1)
                ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                sums[k] += ce.sum().item()
                per_seq[k].append(ce.double().mean(-1).cpu())
                if k == "clean":
                    clean_logp = logp
                elif k != "zero":
                    kls[k] += (clean_logp.exp() * (clean_logp - logp)).sum(-1).sum().item()
            count += targets.numel()
            if on_progress:
                on_progress((bi + 1) / n_batches)
    finally:
        splice.remove()
    ce_clean, ce_zero = sums["clean"] / count, sums["zero"] / count
    out: dict[str, dict[str, float]] = {"clean": {"ce": ce_clean}, "zero": {"ce": ce_zero}}
    for k in saes:
        ce_s = sums[k] / count
        out[k] = {
            "ce_spliced": ce_s,
            "delta_ce": ce_s - ce_clean,
            "loss_recovered": (ce_zero - ce_s) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "kl": kls[k] / count,
        }
    out["clean"]["tokens"] = count
    seq = {k: torch.cat(v) for k, v in per_seq.items()}
    for k in saes:
        out[k]["delta_ce_se"] = _clustered_se(seq[k] - seq["clean"])
    names_sae = list(saes)
    out["paired"] = {
        f"{a}-{b}": {"diff": (seq[a] - seq[b]).mean().item(), "se": _clustered_se(seq[a] - seq[b])}
        for i, a in enumerate(names_sae)
        for b in names_sae[i + 1 :]
    }
    return out


def _clustered_se(per_sequence: torch.Tensor) -> float | None:
    """Standard error of the mean of per-sequence values [s] (None for fewer than 2 sequences)."""
    n = per_sequence.numel()
    return None if n < 2 else (per_sequence.std(unbiased=True) / n**0.5).item()
