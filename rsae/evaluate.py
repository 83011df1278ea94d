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
- KL: mean over the same positions of KL(p_clean || p_spliced), nats; ``kl_zero`` the same with the zero
  splice (SAEBench's ``kl_div_with_ablation``).
- Core statistics (:func:`core_statistics`, the rest of SAEBench's ``core`` evaluation): L1, cosine similarity,
  L2 norms and their ratio, relative reconstruction bias, the legacy explained variance, per-latent firing
  counts (feature density) and the number of sequences each latent fires in.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .config import EVAL_BATCH_SIZES
from .hooknames import HookSite
from .hooks import HookSplice, LowerBlocks, site_for
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


def eval_batch_size(device: str | torch.device) -> int:
    """The default number of sequences per forward on ``device`` (:data:`EVAL_BATCH_SIZES`)."""
    return EVAL_BATCH_SIZES.get(torch.device(device).type, 8)


class _CE:
    """Running sums of the downstream metrics: per column the summed CE, the per-sequence mean CE, the KL to clean."""

    def __init__(self, names: list[str]) -> None:
        self.sums = {k: 0.0 for k in names}
        self.per_seq: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        self.kls = {k: 0.0 for k in names[1:]}

    def add(self, name: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add one column's CE on a batch; returns its log-probs [b, T-2, vocab] (positions 1..T-2)."""
        logp = F.log_softmax(logits[:, 1:-1, :].float(), dim=-1)
        ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        self.sums[name] += ce.sum().item()
        self.per_seq[name].append(ce.double().mean(-1).cpu())
        return logp

    def add_kl(self, name: str, clean_p: torch.Tensor, clean_logp: torch.Tensor, logp: torch.Tensor) -> None:
        """Add sum over tokens of KL(p_clean || p_column) for one batch."""
        self.kls[name] += (clean_p * (clean_logp - logp)).sum(-1).sum().item()


@torch.no_grad()
def downstream_metrics(
    model,
    layer: int | None,
    saes: dict[str, SAE],
    input_ids: torch.Tensor,
    *,
    hook: str | HookSite | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    on_progress: Callable[[float], None] | None = None,
    reuse_lower_blocks: bool = True,
) -> dict[str, dict[str, float]]:
    """CE clean / zero and, per SAE, CE spliced, delta CE, loss recovered and KL.

    Per batch of sequences one full clean forward gives CE clean and the clean log-probs (kept for every KL);
    then the zero splice and each SAE's splice run from the clean forward's output of the blocks below the site
    (:class:`rsae.hooks.LowerBlocks`: only the blocks from the site up, the final norm and the LM head compute),
    which gives the same logits as a full spliced forward (``tests/core/test_downstream.py``).

    Args:
        model, layer, hook: the full host causal LM and the SAEs' site, where x_hat or zeros replace the
            activations (:func:`rsae.hooks.site_for`; ``hook`` None: ``blocks.{layer}.hook_resid_post``).
        saes, input_ids: name -> SAE, each evaluated in one pass over the held-out sequences [s, T].
        batch_size: sequences per forward (None: :func:`eval_batch_size` of ``device``).
        reuse_lower_blocks: False runs every splice as a full forward (the reference path; same results).

    Returns:
        ``{"clean": {"ce": ..., "tokens": n}, "zero": {"ce": ..., "kl": ...}, name: {"ce_spliced", "delta_ce",
        "delta_ce_se", "loss_recovered", "kl"}, ..., "paired": {"a-b": {"diff", "se"}}}`` (nats/token).
        ``delta_ce_se`` is the standard error of delta CE clustered by sequence (tokens of one sequence are
        correlated): std over sequences of the per-sequence mean of CE spliced - CE clean, / sqrt(#sequences).
        ``paired["a-b"]`` is delta CE of a minus delta CE of b on the same tokens, with the same clustered SE
        of the per-sequence differences, for every ordered pair of ``saes`` (a before b in ``saes``).

    Raises:
        ModelError / HookError: a layer or hook the model does not have (:func:`rsae.hooks.site_for`).
    """
    site = site_for(model, layer, hook)
    batch_size = batch_size or eval_batch_size(device)
    splice = HookSplice(model, site)
    lower = LowerBlocks(model, site) if reuse_lower_blocks else None
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"zero": torch.zeros_like, **saes}
    acc = _CE(["clean", *fns])
    count = 0
    n_batches = (input_ids.shape[0] + batch_size - 1) // batch_size
    try:
        for bi, i in enumerate(range(0, input_ids.shape[0], batch_size)):
            ids = input_ids[i : i + batch_size].to(device)
            targets = ids[:, 2:]
            splice.fn = None
            out = lower.record(model, ids) if lower else model(input_ids=ids, use_cache=False)
            clean_logp = acc.add("clean", out.logits, targets)
            del out
            clean_p = clean_logp.exp()
            with lower if lower else contextlib.nullcontext():
                for k, fn in fns.items():
                    splice.fn = fn
                    logp = acc.add(k, model(input_ids=ids, use_cache=False).logits, targets)
                    acc.add_kl(k, clean_p, clean_logp, logp)
                    del logp
            count += targets.numel()
            if on_progress:
                on_progress((bi + 1) / n_batches)
    finally:
        splice.remove()
    return _downstream_summary(acc, list(saes), count)


def _downstream_summary(acc: _CE, names_sae: list[str], count: int) -> dict[str, dict[str, float]]:
    """The dictionary :func:`downstream_metrics` returns, from its running sums over ``count`` tokens."""
    sums, kls = acc.sums, acc.kls
    ce_clean, ce_zero = sums["clean"] / count, sums["zero"] / count
    out: dict[str, dict[str, float]] = {"clean": {"ce": ce_clean}, "zero": {"ce": ce_zero, "kl": kls["zero"] / count}}
    for k in names_sae:
        ce_s = sums[k] / count
        out[k] = {
            "ce_spliced": ce_s,
            "delta_ce": ce_s - ce_clean,
            "loss_recovered": (ce_zero - ce_s) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "kl": kls[k] / count,
        }
    out["clean"]["tokens"] = count
    seq = {k: torch.cat(v) for k, v in acc.per_seq.items()}
    for k in names_sae:
        out[k]["delta_ce_se"] = _clustered_se(seq[k] - seq["clean"])
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


@torch.no_grad()
def core_statistics(sae: SAE, batches: Iterable[torch.Tensor], rows_per_sequence: int | None = None) -> dict[str, Any]:
    """The statistics of SAEBench's ``core`` evaluation (sae_bench 0.6.0 ``evals/core/main.py``, from SAELens's
    ``evals.py``) that :func:`reconstruction_metrics` does not give, over ``batches`` of x [n, d_in].

    Per token i (x_i, x_hat_i = SAE(x_i), z_i = latents), averaged over all tokens:

    - ``l1``: sum_j |z_ij| (SAEBench sums z without the absolute value; equal for non-negative latents);
    - ``cossim``: cos(x_i, x_hat_i) (0 where either is the zero vector);
    - ``l2_norm_in`` / ``l2_norm_out``: ||x_i||, ||x_hat_i||; ``l2_ratio``: ||x_hat_i|| / ||x_i|| (a norm below
      1e-4 divides by 1, as SAEBench does);
    - ``explained_variance_legacy``: 1 - ||x_i - x_hat_i||^2 / ||x_i - mean_b||^2, mean_b the mean of x over
      the token's batch (SAEBench's batch is 16 x 128 = 2048 tokens: pass batches of that size to match);

    and over the whole set, ``relative_reconstruction_bias`` = mean ||x_hat||^2 / mean <x, x_hat> (eq. 10 of
    Rajamanoharan et al. 2024, arXiv 2404.16014; SAEBench averages the per-batch ratios instead).

    Per latent j: ``feature_counts`` [d_sae] (tokens with z_ij != 0) and ``feature_density`` = counts / n (the
    firing rate SAELens stores as log10 in ``sparsity.safetensors``); with ``rows_per_sequence`` (rows are in
    sequence order, each sequence contributing that many consecutive rows), ``feature_sequences`` [d_sae]: the
    number of sequences in which latent j fires at least once (SAEBench's ``consistent_activation_heuristic``
    is counts / sequences).

    Accumulates in float64; memory is one batch.

    Returns:
        The scalars above as floats, ``n_tokens``, and the per-latent tensors (CPU; int64 counts, float64 density).

    Raises:
        ValueError: no tokens in ``batches``.
    """
    device = next(sae.parameters()).device
    d_sae = sae.d_sae
    sums = dict.fromkeys(("l1", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "ev_legacy", "xhat2", "xdot"), 0.0)
    counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
    seqs = torch.zeros(d_sae, dtype=torch.int64, device=device)
    prev_seq, prev_active = -1, torch.zeros(d_sae, dtype=torch.bool, device=device)
    n = 0
    for x in batches:
        x = x.to(device)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        xd, hd = x.double(), x_hat.double()
        n_in, n_out = xd.norm(dim=-1), hd.norm(dim=-1)
        sums["l1"] += z.double().abs().sum().item()
        sums["cossim"] += (torch.nn.functional.cosine_similarity(xd, hd, dim=-1, eps=1e-30)).sum().item()
        sums["l2_norm_in"] += n_in.sum().item()
        sums["l2_norm_out"] += n_out.sum().item()
        sums["l2_ratio"] += (n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum().item()
        resid = (xd - hd).pow(2).sum(-1)
        spread = (xd - xd.mean(0)).pow(2).sum(-1)
        sums["ev_legacy"] += (1 - resid / spread).sum().item()
        sums["xhat2"] += n_out.pow(2).sum().item()
        sums["xdot"] += (xd * hd).sum().item()
        nz = z != 0
        counts += nz.sum(0)
        if rows_per_sequence:
            seq = torch.arange(n, n + x.shape[0], device=device) // rows_per_sequence
            first = int(seq[0])
            local = torch.zeros(int(seq[-1]) - first + 1, d_sae, device=device).index_add_(0, seq - first, nz.float())
            active = local > 0
            if first == prev_seq:  # a sequence split across two batches counts once
                active[0] &= ~prev_active
                prev_active = prev_active | (local[0] > 0) if active.shape[0] == 1 else local[-1] > 0
            else:
                prev_active = local[-1] > 0
            prev_seq = int(seq[-1])
            seqs += active.sum(0)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no evaluation tokens")
    out: dict[str, Any] = {k: v / n for k, v in sums.items() if k not in ("ev_legacy", "xhat2", "xdot")}
    out["explained_variance_legacy"] = sums["ev_legacy"] / n
    out["relative_reconstruction_bias"] = sums["xhat2"] / sums["xdot"] if sums["xdot"] else float("nan")
    out["n_tokens"] = n
    out["feature_counts"] = counts.cpu()
    out["feature_density"] = counts.cpu().double() / n
    if rows_per_sequence:
        out["feature_sequences"] = seqs.cpu()
    return out
