"""The training loop of every SAE in this project (teachers, the RSAE, the control): Adam on a family's
objective with an optional L0 controller and resumable checkpoints.

Objective (all SAE training in this project, teacher and RSAE alike):

    L = mean_tokens ||x - x_hat||_2^2  +  lambda * mean_tokens sum_j |z_j| * ||W_dec[j]||_2

The decoder-norm weighting (Anthropic, "Update on dictionary learning improvements", April 2024; SAELens
``scale_sparsity_penalty_by_decoder_norm``) makes the penalty invariant to rescaling z against W_dec, which
matters here because fine-tuning frees every parameter. Units: x in the model's residual units, so MSE is
in squared residual units per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from .activations import ActivationStore
from .saes import SAE, LossFn
from .sparse import training_loss


def train_sae(
    sae: SAE,
    store: ActivationStore,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    l1_coefficient: float,
    seed: int = 0,
    device: str = "cpu",
    param_groups: Iterable[dict[str, Any]] | None = None,
    warmup_steps: int = 0,
    l1_warmup_steps: int = 0,
    lr_decay_frac: float = 0.2,
    loss_fn: LossFn | None = None,
    l0_target: float | None = None,
    l0_adapt_every: int = 10,
    l0_gain: float = 2.0,
    l0_max_step: float = 1.25,
    grad_clip: float | None = 1e4,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: TrainCheckpoint | None = None,
    path: str = "dense",
) -> list[dict[str, float]]:
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
        l0_target, l0_adapt_every, l0_gain, l0_max_step: if a target is given, lambda is adapted to hold the
            training L0 at or below it (:class:`L0Controller`; why gain 2: ``docs/method.md#defaults``); the final
            lambda is recorded in the last history entry as ``lambda``.
        grad_clip: clip the global gradient norm (None disables).
        on_step: called with (step, parts) after every step (step counts from 1).
        checkpoint: if given, training resumes from ``checkpoint.load()`` (model, Adam, lambda controller,
            history, step; the batch stream is advanced to the same position) and the state is passed to
            ``checkpoint.save`` every ``checkpoint.every`` steps and after the last step (after ``on_step``).
        path: "dense" (autograd, as before), "sparse" or "auto" (:func:`rsae.sparse.training_loss`).

    Returns:
        Per-step history of the loss parts (each with the ``lambda`` used).
    """
    sae.to(device).train()
    groups = list(param_groups) if param_groups is not None else [{"params": list(sae.parameters())}]
    opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))
    base_lrs = [g.get("lr", lr) for g in opt.param_groups]
    decay_start = int(steps * (1 - lr_decay_frac))

    history: list[dict[str, float]] = []
    batches = store.iter_batches(batch_size, seed=seed, device=device)
    loss_fn = training_loss(sae, loss_fn, path)
    ctrl = L0Controller(float(l1_coefficient), l0_target, l0_adapt_every, l0_gain, l0_max_step)
    params = [p for g in opt.param_groups for p in g["params"]]
    start = 0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        start, history, ctrl.lam, ctrl.window = _restore_train_state(sae, opt, state)
        for _ in range(start):  # the batches an uninterrupted run would have consumed
            next(batches)
    for step in range(start, steps):
        x = next(batches)
        lam = ctrl.lam * (min(1.0, (step + 1) / l1_warmup_steps) if l1_warmup_steps else 1.0)
        loss, parts = loss_fn(sae, x, lam)
        _optimizer_step(opt, base_lrs, lr_scale(step, steps, warmup_steps, decay_start), loss, params, grad_clip)
        parts["lambda"] = lam
        history.append(parts)
        ctrl.update(parts["l0"])
        if on_step is not None:
            on_step(step + 1, parts)
        if checkpoint is not None and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
            checkpoint.save(_train_state(step + 1, sae, opt, ctrl, history))
    sae.eval()
    return history


@dataclass
class L0Controller:
    """Holds a training L0 at or below ``target`` by scaling the sparsity coefficient ``lam``: after every
    ``every`` steps, lam *= exp(``gain`` * (mean L0 / target - 1)) clipped to [1 / ``max_step``, ``max_step``]
    (default [0.8, 1.25]; a multiplicative
    integral controller on the sparsity constraint, in the spirit of the Lagrangian sparsity control of
    Rajamanoharan et al. 2024 and Gao et al. 2024's fixed-L0 training). ``target`` None: lam stays fixed.
    ``window``: the L0s (latents per token) since the last update."""

    lam: float
    target: float | None
    every: int = 10
    gain: float = 2.0
    max_step: float = 1.25
    window: list[float] = field(default_factory=list)

    def update(self, l0: float) -> None:
        """Record one step's training L0; adapt ``lam`` when the window is full."""
        if self.target is None:
            return
        self.window.append(l0)
        if len(self.window) == self.every:
            ratio = sum(self.window) / len(self.window) / max(self.target, 1e-9)
            self.lam *= min(self.max_step, max(1.0 / self.max_step, math.exp(self.gain * (ratio - 1.0))))
            self.window.clear()


def _optimizer_step(
    opt: torch.optim.Optimizer,
    base_lrs: list[float],
    scale: float,
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    grad_clip: float | None,
) -> None:
    """One Adam step on ``loss``: every group's lr = its base lr x ``scale``, gradients clipped to a global
    norm of ``grad_clip`` (None: not clipped)."""
    for g, base in zip(opt.param_groups, base_lrs):
        g["lr"] = base * scale
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def _train_state(
    step: int, sae: SAE, opt: torch.optim.Optimizer, ctrl: L0Controller, history: list[dict[str, float]]
) -> dict[str, Any]:
    """The :class:`TrainCheckpoint` state after ``step`` optimizer steps."""
    return {
        "step": step,
        "model": sae.state_dict(),
        "optimizer": opt.state_dict(),
        "lam_base": ctrl.lam,
        "l0_window": list(ctrl.window),
        "history": history,
        "rng": torch.get_rng_state(),
    }


def lr_scale(step: int, steps: int, warmup_steps: int, decay_start: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``steps``: linear warm-up over ``warmup_steps``, then
    1, then a linear decay to 0 from step ``decay_start``."""
    s = 1.0
    if warmup_steps and step < warmup_steps:
        s = (step + 1) / warmup_steps
    if step >= decay_start and steps > decay_start:
        s *= max(0.0, (steps - step) / (steps - decay_start))
    return s


class TrainCheckpoint(Protocol):
    """Where :func:`train_sae` keeps its resumable state (see :class:`rsae.pipeline.checkpoints.Checkpoints`).

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


def _restore_train_state(
    sae: SAE, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> tuple[int, list[dict[str, float]], float, list[float]]:
    """Load a :class:`TrainCheckpoint` state into ``sae`` and ``opt``; returns (step, history, lam_base,
    l0_window)."""
    sae.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return (
        int(state["step"]),
        list(state["history"]),
        float(state["lam_base"]),
        [float(v) for v in state["l0_window"]],
    )


@torch.no_grad()
def sample_pre_acts(teacher: SAE, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Teacher pre-activations h [n, d_sae] of x [n, d_in]."""
    return torch.cat([teacher.pre_acts(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
