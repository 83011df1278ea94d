"""Teacher SAE training on real activations (no pretrained SAE can be downloaded on the project's machines).

All families: tied init with decoder rows of norm 0.1, b_dec initialised to the activations' mean, Adam,
linear warm-up and a linear decay over the last 20% of steps; saved in the SAELens layout with the
training settings in ``metadata``.

- ``relu`` (SAELens "standard"; Bricken et al. 2023, Anthropic's April 2024 update): MSE + lambda *
  sum_j |z_j| ||W_dec[j]||, lambda warmed up over the first 5% of steps.
- ``jumprelu`` (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope): MSE + lambda * L0, where L0 =
  sum_j H(h_j - theta_j) with the straight-through kernel estimator for theta (rectangle kernel of
  bandwidth ``bandwidth``, in units of h), thresholds trained in log space; lambda warmed up.
- ``topk`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): MSE + AuxK / 32, where AuxK
  is the MSE of reconstructing the residual error from the top ``k_aux`` pre-activations of latents dead
  for ``dead_tokens`` tokens (Gao et al. 2024, section A.2).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .activations import ActivationStore, extract_activations
from .device import pick_device
from .models import load_model
from .sae import JumpReLUSAE, ReLUSAE, SAE, TopKSAE, decoder_norm_l1
from .train import train_sae

DEFAULT_COEFFICIENT = {"relu": 10.0, "jumprelu": 5.0, "topk": 0.0}
"""Default sparsity coefficient per family for raw SmolLM2 residuals (norm ~95): lambda of the L1 term
(relu), of the L0 term (jumprelu); unused for topk (k sets the sparsity). Measured at layer 3, d_sae 2304,
600 steps of 1024 rows on 32,768 BBC train tokens (held-out, 8,192 tokens): relu L0 71 / FVU 0.125;
jumprelu (5.0) L0 74 / FVU 0.078 (0.5 gave L0 360); topk (k = 32) FVU 0.088."""
DEFAULT_K = 32
"""Default k of a TopK teacher."""
JUMPRELU_INIT_THRESHOLD = 1.0
"""Initial theta of a JumpReLU teacher, units of h."""
JUMPRELU_BANDWIDTH = 0.5
"""Kernel bandwidth of the straight-through estimator, units of h."""


def jumprelu_l0_loss(sae: SAE, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """JumpReLU objective MSE + lam * L0 (Rajamanoharan et al. 2024, eq. 9); x: [n, d_in]."""
    h = sae.pre_acts(x)
    z = sae.gate(h)
    x_hat = sae.decode(z)
    mse = (x - x_hat).pow(2).sum(-1).mean()
    l0 = sae.step(h).sum(-1).mean()
    loss = mse + lam * l0
    return loss, {"loss": loss.item(), "mse": mse.item(), "l0": (z != 0).sum(-1).float().mean().item(),
                  "l1": decoder_norm_l1(z.detach(), sae.W_dec.detach()).item()}


class TopKLoss:
    """TopK objective MSE + AuxK / 32 (Gao et al. 2024, section A.2), with dead-latent tracking.

    Args:
        d_sae: latents. k_aux: latents used by AuxK (default min(512, d_sae // 2)).
        dead_tokens: a latent not active for this many training tokens counts as dead.
    """

    def __init__(self, d_sae: int, *, k_aux: int | None = None, dead_tokens: int = 100_000,
                 aux_coefficient: float = 1 / 32) -> None:
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
        return loss, {"loss": loss.item(), "mse": mse.item(), "l0": (z != 0).sum(-1).float().mean().item(),
                      "l1": l1.item(), "aux": aux.item(), "dead": n_dead}


def train_teacher(store: ActivationStore, *, family: str = "relu", d_sae: int = 2304, steps: int = 2000,
                  batch_size: int = 1024, lr: float = 1e-3, l1_coefficient: float | None = None,
                  k: int = DEFAULT_K, seed: int = 0, device: str = "cpu", metadata: dict | None = None,
                  on_progress: Callable[[float], None] | None = None) -> SAE:
    """Train a teacher SAE of ``family`` on ``store`` (activations [n, d_in]); see the module docstring.

    Args:
        l1_coefficient: sparsity coefficient (L1 for relu, L0 for jumprelu); None: the family default.
        k: active latents per token of a topk teacher.

    Returns:
        The trained SAE (CPU, eval mode); ``metadata`` records the settings, including the coefficient
        (``l1_coefficient`` for relu, ``l0_coefficient`` for jumprelu).

    Raises:
        ValueError: unknown family.
    """
    if family not in DEFAULT_COEFFICIENT:
        raise ValueError(f"teacher family {family!r} unknown; choose one of {sorted(DEFAULT_COEFFICIENT)}")
    lam = DEFAULT_COEFFICIENT[family] if l1_coefficient is None else l1_coefficient
    torch.manual_seed(seed)
    meta = {**(metadata or {}), "family": family, "train_steps": steps, "train_batch_size": batch_size,
            "train_lr": lr, "train_tokens": store.rows, "seed": seed, "trained_by": "rsae.teacher.train_teacher"}
    loss_fn = None
    groups = None
    if family == "relu":
        sae: SAE = ReLUSAE(store.d_in, d_sae, metadata={**meta, "l1_coefficient": lam,
                                                          "sparsity_penalty": "sum_j |z_j| * ||W_dec[j]||"})
    elif family == "jumprelu":
        sae = JumpReLUSAE(store.d_in, d_sae, bandwidth=JUMPRELU_BANDWIDTH,
                          metadata={**meta, "l0_coefficient": lam, "sparsity_penalty": "L0 (straight-through)"})
        loss_fn = jumprelu_l0_loss
    else:
        sae = TopKSAE(store.d_in, d_sae, k=k, metadata={**meta, "k": k, "sparsity_penalty": "topk + auxk/32"})
        loss_fn = TopKLoss(d_sae, dead_tokens=max(20 * batch_size, 50_000))
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.copy_(store.load(min(store.rows, 16384)).mean(0))
        if isinstance(sae, JumpReLUSAE):
            sae.log_threshold.fill_(float(torch.tensor(JUMPRELU_INIT_THRESHOLD).log()))
    if isinstance(sae, JumpReLUSAE):  # thresholds move in log space: a larger step size
        groups = [{"params": [p for n, p in sae.named_parameters() if n != "log_threshold"], "lr": lr},
                  {"params": [sae.log_threshold], "lr": 10 * lr}]

    def step_cb(step: int, parts: dict) -> None:
        if on_progress and (step % 20 == 0 or step == steps):
            on_progress(step / steps)

    train_sae(sae, store, steps=steps, batch_size=batch_size, lr=lr, l1_coefficient=lam, seed=seed,
              device=device, warmup_steps=min(100, steps // 10), l1_warmup_steps=max(1, steps // 20),
              loss_fn=loss_fn, param_groups=groups, on_step=step_cb)
    return sae.cpu().eval()


def train_teacher_from_text(model: str = "smollm2-135m", layer: int = 3, out: str | Path = "teacher", *,
                            family: str = "relu", dataset: str = "bbc-news", d_sae: int = 2304,
                            train_tokens: int = 65_536, steps: int = 2000, batch_size: int = 1024,
                            lr: float = 1e-3, l1_coefficient: float | None = None, k: int = DEFAULT_K,
                            ctx_len: int = 128,
                            eval_fraction: float = 0.2, seed: int = 0, device: str | None = None,
                            on_progress: Callable[[float], None] | None = None) -> Path:
    """Extract ``train_tokens`` activations of the *train* split, train a teacher, save it to ``out``.

    The same ``dataset``/``eval_fraction``/``seed`` split as the upgrade's, so the teacher never sees
    held-out documents. Progress: extraction is the first 30%, training the rest.

    Returns:
        ``out`` (SAELens layout folder).
    """
    dev = pick_device(device)
    t0 = time.time()
    lm, tok = load_model(model, device=dev)
    with tempfile.TemporaryDirectory(prefix="rsae-teacher-acts-") as tmp:
        extract_activations(lm, tok, layer=layer, dataset=dataset, split="train", n_tokens=train_tokens,
                            out_dir=tmp, ctx_len=ctx_len, eval_fraction=eval_fraction, seed=seed,
                            device=dev, on_progress=(lambda f: on_progress(0.3 * f)) if on_progress else None)
        del lm
        store = ActivationStore(tmp)
        sae = train_teacher(store, family=family, d_sae=d_sae, steps=steps, batch_size=batch_size, lr=lr,
                            l1_coefficient=l1_coefficient, k=k, seed=seed, device=dev,
                            metadata={"model_name": model, "hook_name": f"blocks.{layer}.hook_resid_post",
                                      "hook_layer": layer, "dataset_path": dataset, "context_size": ctx_len,
                                      "prepend_bos": False, "position_0_dropped": True},
                            on_progress=(lambda f: on_progress(0.3 + 0.7 * f)) if on_progress else None)
    sae.metadata["train_seconds"] = round(time.time() - t0, 1)
    return sae.save(out)
