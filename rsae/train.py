"""Training loops: SAE training / fine-tuning (Adam on MSE + lambda * L1) and gate calibration.

Objective (all SAE training in this project, teacher and RSAE alike):

    L = mean_tokens ||x - x_hat||_2^2  +  lambda * mean_tokens sum_j |z_j| * ||W_dec[j]||_2

The decoder-norm weighting (Anthropic, "Update on dictionary learning improvements", April 2024; SAELens
``scale_sparsity_penalty_by_decoder_norm``) makes the penalty invariant to rescaling z against W_dec, which
matters here because fine-tuning frees every parameter. Units: x in the model's residual units, so MSE is
in squared residual units per token.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Protocol

import torch

from .activations import ActivationStore
from .rational import RationalSAE
from .sae import SAE, decoder_norm_l1


def sae_loss(sae: SAE, x: torch.Tensor, l1_coefficient: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss on a batch x [n, d_in] and its parts (mse, l1, l0) as floats."""
    z = sae.encode(x)
    x_hat = sae.decode(z)
    mse = (x - x_hat).pow(2).sum(-1).mean()
    l1 = decoder_norm_l1(z, sae.W_dec)
    loss = mse + l1_coefficient * l1
    return loss, {"loss": loss.item(), "mse": mse.item(), "l1": l1.item(),
                  "l0": (z != 0).sum(-1).float().mean().item()}


LossFn = Callable[[SAE, torch.Tensor, float], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(sae, x, coefficient) -> (loss, parts)``: a training objective; :func:`sae_loss` is the default."""


def train_sae(sae: SAE, store: ActivationStore, *, steps: int, batch_size: int, lr: float,
              l1_coefficient: float, seed: int = 0, device: str = "cpu",
              param_groups: Iterable[dict[str, Any]] | None = None, warmup_steps: int = 0,
              l1_warmup_steps: int = 0, lr_decay_frac: float = 0.2, loss_fn: LossFn | None = None,
              l0_target: float | None = None, l0_adapt_every: int = 10, l0_gain: float = 2.0,
              grad_clip: float | None = 1e4,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              checkpoint: TrainCheckpoint | None = None) -> list[dict[str, float]]:
    """Adam on :func:`sae_loss` over shuffled batches of ``store``.

    Args:
        sae: trained in place (moved to ``device``).
        store: training activations.
        steps, batch_size, lr: Adam steps, rows per step, learning rate (default group).
        l1_coefficient: lambda.
        param_groups: optional explicit Adam groups (e.g. a higher lr for the gate scalars).
        warmup_steps: linear lr warm-up; ``lr_decay_frac``: final fraction of steps with linear decay to 0.
        l1_warmup_steps: lambda ramps linearly from 0 (helps a freshly initialised SAE avoid dead latents).
        loss_fn: the objective (default :func:`sae_loss`, MSE + lambda * decoder-norm-weighted L1).
        l0_target: if given, lambda is adapted to hold the training L0 at or below this value: every
            ``l0_adapt_every`` steps, lambda *= exp(``l0_gain`` * (mean L0 / l0_target - 1)) clipped to
            [0.8, 1.25] (a multiplicative integral controller on the sparsity constraint, in the spirit of the
            Lagrangian sparsity control of Rajamanoharan et al. 2024 / Gao et al. 2024's fixed-L0 training).
            The final lambda is recorded in the last history entry as ``lambda``. Gain 2 (was 0.5): a JumpReLU
            RSAE starting from the auto lambda needed ~5x its start value and, at gain 0.5 (2.5% per update
            at 5% over target), was still above target and still raising lambda at step 600.
        grad_clip: clip the global gradient norm (None disables).
        on_step: called with (step, parts) after every step (step counts from 1).
        checkpoint: if given, training resumes from ``checkpoint.load()`` (model, Adam, lambda controller,
            history, step; the batch stream is advanced to the same position) and the state is passed to
            ``checkpoint.save`` every ``checkpoint.every`` steps and after the last step (after ``on_step``).

    Returns:
        Per-step history of the loss parts (each with the ``lambda`` used).
    """
    sae.to(device).train()
    groups = list(param_groups) if param_groups is not None else [{"params": list(sae.parameters())}]
    opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))
    base_lrs = [g.get("lr", lr) for g in opt.param_groups]
    decay_start = int(steps * (1 - lr_decay_frac))

    def lr_scale(step: int) -> float:
        s = 1.0
        if warmup_steps and step < warmup_steps:
            s = (step + 1) / warmup_steps
        if step >= decay_start and steps > decay_start:
            s *= max(0.0, (steps - step) / (steps - decay_start))
        return s

    history: list[dict[str, float]] = []
    batches = store.iter_batches(batch_size, seed=seed, device=device)
    loss_fn = loss_fn or sae_loss
    lam_base = float(l1_coefficient)
    l0_window: list[float] = []
    params = [p for g in opt.param_groups for p in g["params"]]
    start = 0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        start, history, lam_base, l0_window = _restore_train_state(sae, opt, state)
        for _ in range(start):  # the batches an uninterrupted run would have consumed
            next(batches)
    for step in range(start, steps):
        x = next(batches)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_scale(step)
        lam = lam_base * (min(1.0, (step + 1) / l1_warmup_steps) if l1_warmup_steps else 1.0)
        loss, parts = loss_fn(sae, x, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        parts["lambda"] = lam
        history.append(parts)
        if l0_target is not None:
            l0_window.append(parts["l0"])
            if len(l0_window) == l0_adapt_every:
                ratio = sum(l0_window) / len(l0_window) / max(l0_target, 1e-9)
                lam_base *= min(1.25, max(0.8, math.exp(l0_gain * (ratio - 1.0))))
                l0_window.clear()
        if on_step is not None:
            on_step(step + 1, parts)
        if checkpoint is not None and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
            checkpoint.save({"step": step + 1, "model": sae.state_dict(), "optimizer": opt.state_dict(),
                             "lam_base": lam_base, "l0_window": list(l0_window), "history": history,
                             "rng": torch.get_rng_state()})
    sae.eval()
    return history


class TrainCheckpoint(Protocol):
    """Where :func:`train_sae` keeps its resumable state (see :class:`rsae.pipeline.Checkpoints`).

    The state is a dict of tensors and plain Python values (``torch.load(weights_only=True)``-safe):
    ``step`` (optimizer steps done), ``model`` / ``optimizer`` (state dicts), ``lam_base`` and
    ``l0_window`` (the L0 controller), ``history`` (per-step loss parts), ``rng`` (torch CPU RNG state).
    """

    every: int
    """Save every this many steps (and after the last one)."""

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None to start from step 0."""

    def save(self, state: dict[str, Any]) -> None:
        """Persist ``state`` (atomically)."""


def _restore_train_state(sae: SAE, opt: torch.optim.Optimizer, state: dict[str, Any]
                         ) -> tuple[int, list[dict[str, float]], float, list[float]]:
    """Load a :class:`TrainCheckpoint` state into ``sae`` and ``opt``; returns (step, history, lam_base,
    l0_window)."""
    sae.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return (int(state["step"]), list(state["history"]), float(state["lam_base"]),
            [float(v) for v in state["l0_window"]])


@torch.no_grad()
def sample_pre_acts(teacher: SAE, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Teacher pre-activations h [n, d_sae] of x [n, d_in]."""
    return torch.cat([teacher.pre_acts(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def calibration_loss(gate, h: torch.Tensor, target: torch.Tensor,
                     selected: torch.Tensor | None = None) -> torch.Tensor:
    """The calibration objective of :func:`calibrate_gate` on one sample (0-dim tensor, squared units of z).

    ``mean (phi_raw(h) - g(h))^2`` over all entries of ``h`` [n, d_sae] (``target`` = g(h), same shape); with
    ``selected`` [n, d_sae] (bool), entries outside it count as exact zeros (the RSAE's selection zeroes
    them), i.e. ``phi_raw`` is replaced by 0 there. ``gate``: a :class:`rsae.rational.RationalGate`.
    """
    out = gate.raw(h)
    if selected is not None:
        out = torch.where(selected, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return (out - target).pow(2).mean()


def calibrate_gate(rsae: RationalSAE, h: torch.Tensor, target: torch.Tensor, *, steps: int, lr: float,
                   seed: int = 0, sample: int = 1 << 17, decay_frac: float = 0.5,
                   selected: torch.Tensor | None = None,
                   on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Calibrate (a, b, C_in, C_out) with all SAE weights (and per-latent scales) frozen.

    Adam on the l2 objective mean (phi_raw(h) - g(h))^2 over the teacher's real pre-activations (RSAE
    summary, "calibration"); each step uses ``sample`` (token, latent) entries: random whole token rows of
    ``h``, so every entry keeps its latent's scale. The learning rate decays linearly to 0 over the last
    ``decay_frac`` of the steps, so the final scalars are not left at the noise level of one sample. Only the
    gate scalars require gradients meanwhile (the weights and per-latent scales are frozen for the loop).

    Cost: one fused gate forward + backward over ``sample`` entries per step. Measured (ReLU teacher, (5, 4),
    300 steps, loaded 2-core CPU): 2^17 entries with the decay 77 s, held-out init MSE -0.49% vs the teacher;
    the earlier default 2^20 without decay 279 s, -0.34% (``docs/method.md``).

    Args:
        h: real pre-activations [n, d_sae]; target: the teacher's gate output g(h), same shape.
        selected: optional bool mask [n, d_sae] of the entries the RSAE's selection keeps (the teacher's
            active entries): the objective becomes mean (selected * phi_raw(h) - g(h))^2, i.e. entries outside
            it count as exact zeros (``CalibrateConfig.objective = "selected"``).
        steps, lr: Adam steps and peak learning rate. sample: entries per step (rounded to whole rows).

    Returns:
        Loss per step (squared units of z).
    """
    g = rsae.gate_fn
    params = [g.a, g.b, g.log_c_in, g.log_c_out]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, min(h.shape[0], sample // max(1, h.shape[-1])))
    losses = []
    frozen = [p for p in rsae.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:  # no gradient work for the frozen weights / per-latent scales
        p.requires_grad_(False)
    decay_start = int(steps * (1.0 - decay_frac))
    try:
        for step in range(steps):
            if step >= decay_start and steps > decay_start:
                opt.param_groups[0]["lr"] = lr * (steps - step) / (steps - decay_start)
            idx = torch.randint(0, h.shape[0], (rows,), generator=gen).to(h.device)
            loss = calibration_loss(g, h[idx], target[idx], None if selected is None else selected[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return losses


@torch.no_grad()
def set_floor(rsae: RationalSAE, h: torch.Tensor, teacher_l0: float, *, max_entries: int = 16_000_000) -> float:
    """Set the exact-zero floor (units of r) so that the RSAE's mean L0 on ``h`` equals ``teacher_l0``.

    The floor is the (1 - teacher_l0 / d_sae) quantile of r(t) over the (token, latent) entries of the real
    pre-activations ``h`` [n, d_sae]: exactly as many entries pass as the teacher activates, so L0 is
    matched by construction on these tokens (held-out L0 is measured and reported). Clipped below at 0.

    Returns:
        The floor, in units of r (the unit-interval gate).
    """
    r = rsae.gate_fn.unit(h).reshape(-1).float()
    if r.numel() > max_entries:
        r = r[torch.randperm(r.numel(), device=r.device)[:max_entries]]
    frac_active = min(1.0, max(0.0, teacher_l0 / h.shape[-1]))
    k = max(1, min(r.numel(), int(round((1.0 - frac_active) * r.numel()))))
    floor = max(0.0, r.kthvalue(k).values.item())
    rsae.gate_fn.floor.fill_(floor)
    return floor
