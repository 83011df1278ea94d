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
from typing import Any, Callable, Iterable

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


def train_sae(sae: SAE, store: ActivationStore, *, steps: int, batch_size: int, lr: float,
              l1_coefficient: float, seed: int = 0, device: str = "cpu",
              param_groups: Iterable[dict[str, Any]] | None = None, warmup_steps: int = 0,
              l1_warmup_steps: int = 0, lr_decay_frac: float = 0.2,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Adam on :func:`sae_loss` over shuffled batches of ``store``.

    Args:
        sae: trained in place (moved to ``device``).
        store: training activations.
        steps, batch_size, lr: Adam steps, rows per step, learning rate (default group).
        l1_coefficient: lambda.
        param_groups: optional explicit Adam groups (e.g. a higher lr for the gate scalars).
        warmup_steps: linear lr warm-up; ``lr_decay_frac``: final fraction of steps with linear decay to 0.
        l1_warmup_steps: lambda ramps linearly from 0 (helps a freshly initialised SAE avoid dead latents).
        on_step: called with (step, parts) after every step (step counts from 1).

    Returns:
        Per-step history of the loss parts.
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
    for step in range(steps):
        x = next(batches)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_scale(step)
        lam = l1_coefficient * (min(1.0, (step + 1) / l1_warmup_steps) if l1_warmup_steps else 1.0)
        loss, parts = sae_loss(sae, x, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(parts)
        if on_step is not None:
            on_step(step + 1, parts)
    sae.eval()
    return history


@torch.no_grad()
def sample_pre_acts(teacher: SAE, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Teacher pre-activations h [n, d_sae] of x [n, d_in]."""
    return torch.cat([teacher.pre_acts(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def calibrate_gate(rsae: RationalSAE, h: torch.Tensor, target: torch.Tensor, *, steps: int, lr: float,
                   seed: int = 0, sample: int = 1 << 20,
                   on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Calibrate (a, b, C_in, C_out) with SAE weights frozen: Adam on mean (phi_raw(h) - g(h))^2.

    The l2 objective over the teacher's real pre-activations (RSAE summary, "calibration"); each step uses
    a random subsample of ``sample`` (token, latent) entries of ``h`` [n, d_sae].

    Args:
        h: real pre-activations [n, d_sae]; target: teacher gate values g(h), same shape.

    Returns:
        Loss per step.
    """
    g = rsae.gate_fn
    params = [g.a, g.b, g.log_c_in, g.log_c_out]
    opt = torch.optim.Adam(params, lr=lr)
    hf, tf = h.reshape(-1), target.reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, hf.numel(), (min(sample, hf.numel()),), generator=gen).to(hf.device)
        loss = (g.raw(hf[idx]) - tf[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses


@torch.no_grad()
def set_floor(rsae: RationalSAE, h: torch.Tensor, teacher_active: torch.Tensor, *,
              leak: float = 1e-4) -> float:
    """Set the exact-zero floor to the (1 - leak) quantile of phi_raw(h) over teacher-inactive entries.

    Args:
        h: real pre-activations [n, d_sae]; teacher_active: bool mask of the teacher's non-zeros.
        leak: share of teacher-inactive entries allowed through.

    Returns:
        The floor (>= 0), in units of z.
    """
    y = rsae.gate_fn.raw(h)[~teacher_active]
    if y.numel() == 0:
        floor = 0.0
    else:
        k = max(1, int(math.ceil((1 - leak) * y.numel())))
        floor = max(0.0, y.float().kthvalue(k).values.item() if y.numel() < 16_000_000
                    else torch.quantile(y[torch.randperm(y.numel())[:16_000_000]], 1 - leak).item())
    rsae.gate_fn.floor.fill_(floor)
    return floor
