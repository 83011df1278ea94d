"""Teacher SAE training on real activations (no pretrained SAE can be downloaded on the project's machines).

Each family's SAE, loss, default coefficient and parameter groups come from its module in
:mod:`rsae.saes` (:class:`rsae.saes.Family`); this module runs the training. All families: tied init with
decoder rows of norm 0.1, b_dec initialised to the activations' mean, Adam, linear warm-up and a linear decay
over the last 20% of steps; saved in the SAELens layout with the training settings in ``metadata``.

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
from .saes import SAE, family_names, get_family
from .saes.topk import DEFAULT_K
from .train import train_sae


def train_teacher(
    store: ActivationStore,
    *,
    family: str = "relu",
    d_sae: int = 2304,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    l1_coefficient: float | None = None,
    k: int = DEFAULT_K,
    seed: int = 0,
    device: str = "cpu",
    metadata: dict | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> SAE:
    """Train a teacher SAE of ``family`` on ``store`` (activations [n, d_in]); see the module docstring.

    Args:
        l1_coefficient: sparsity coefficient (L1 for relu, L0 for jumprelu); None: the family's
            ``default_coefficient`` (evidence for the defaults: ``docs/method.md``).
        k: active latents per token of a topk teacher.

    Returns:
        The trained SAE (CPU, eval mode); ``metadata`` records the settings, including the coefficient
        (``l1_coefficient`` for relu, ``l0_coefficient`` for jumprelu).

    Raises:
        ValueError: unknown family.
    """
    if family not in family_names():
        raise ValueError(f"teacher family {family!r} unknown; choose one of {sorted(family_names())}")
    fam = get_family(family)
    lam = fam.default_coefficient if l1_coefficient is None else l1_coefficient
    torch.manual_seed(seed)
    meta = {
        **(metadata or {}),
        "family": family,
        "train_steps": steps,
        "train_batch_size": batch_size,
        "train_lr": lr,
        "train_tokens": store.rows,
        "seed": seed,
        "trained_by": "rsae.teacher.train_teacher",
    }
    sae = fam.new_teacher(store.d_in, d_sae, k=k, coefficient=lam, metadata=meta)
    loss_fn = fam.train_teacher_objective(sae, batch_size)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.copy_(store.load(min(store.rows, 16384)).mean(0))
    groups = fam.teacher_param_groups(sae, lr)

    def step_cb(step: int, parts: dict) -> None:
        if on_progress and (step % 20 == 0 or step == steps):
            on_progress(step / steps)

    train_sae(
        sae,
        store,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        l1_coefficient=lam,
        seed=seed,
        device=device,
        warmup_steps=min(100, steps // 10),
        l1_warmup_steps=max(1, steps // 20),
        loss_fn=loss_fn,
        param_groups=groups,
        on_step=step_cb,
    )
    return sae.cpu().eval()


def _teacher_metadata(model: str, manifest: dict, dataset: str, ctx_len: int) -> dict:
    """The SAELens ``metadata`` of a teacher trained on an extraction with the legacy context conventions
    (:data:`rsae.data.LEGACY_DEFAULTS`): model, hook site, data and the conventions, in SAELens names."""
    return {
        "model_name": model,
        "hook_name": manifest["hook"],
        "hook_layer": manifest["layer"],
        "dataset_path": dataset,
        "context_size": ctx_len,
        "prepend_bos": False,
        "position_0_dropped": True,
        # the context conventions of the extraction above (rsae.data.LEGACY_DEFAULTS), in SAELens names
        "seqpos_slice": [1, None],
        "exclude_special_tokens": False,
        "sequence_separator_token": None,
        "disable_concat_sequences": False,
    }


def train_teacher_from_text(
    model: str = "smollm2-135m",
    layer: int | None = 3,
    out: str | Path = "teacher",
    *,
    hook: str | None = None,
    family: str = "relu",
    dataset: str = "bbc-news",
    d_sae: int = 2304,
    train_tokens: int = 65_536,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    l1_coefficient: float | None = None,
    k: int = DEFAULT_K,
    ctx_len: int = 128,
    eval_fraction: float = 0.2,
    seed: int = 0,
    device: str | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> Path:
    """Extract ``train_tokens`` activations of the *train* split, train a teacher, save it to ``out``.

    The same ``dataset``/``eval_fraction``/``seed`` split as the upgrade's, so the teacher never sees
    held-out documents. Progress: extraction is the first 30%, training the rest. The activations are read at
    ``hook`` (:func:`rsae.hooks.site_for`: a TransformerLens name, a bare site with ``layer``, or a module path),
    by default ``blocks.{layer}.hook_resid_post``; the cfg records the site as ``hook_name``.

    Returns:
        ``out`` (SAELens layout folder).
    """
    dev = pick_device(device)
    t0 = time.time()
    lm, tok = load_model(model, device=dev)
    with tempfile.TemporaryDirectory(prefix="rsae-teacher-acts-") as tmp:
        manifest = extract_activations(
            lm,
            tok,
            layer=layer,
            hook=hook,
            dataset=dataset,
            split="train",
            n_tokens=train_tokens,
            out_dir=tmp,
            ctx_len=ctx_len,
            eval_fraction=eval_fraction,
            seed=seed,
            device=dev,
            on_progress=(lambda f: on_progress(0.3 * f)) if on_progress else None,
        )
        del lm
        store = ActivationStore(tmp)
        sae = train_teacher(
            store,
            family=family,
            d_sae=d_sae,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            l1_coefficient=l1_coefficient,
            k=k,
            seed=seed,
            device=dev,
            metadata=_teacher_metadata(model, manifest, dataset, ctx_len),
            on_progress=(lambda f: on_progress(0.3 + 0.7 * f)) if on_progress else None,
        )
    sae.metadata["train_seconds"] = round(time.time() - t0, 1)
    return sae.save(out)
