"""Stage 5, evaluate: held-out metrics of the teacher, the RSAE at init, the fine-tuned RSAE and the control.

Reconstruction metrics on every held-out row; downstream CE / KL by splicing each SAE into the host model on
``eval.ce_sequences`` held-out sequences, with paired differences (:func:`rsae.evaluate.downstream_metrics`);
k-sparse probing on labelled data sets; the data of the report's gate figure; the latent identity of the RSAE
and the control against the teacher (:func:`rsae.identity.evaluate_identity`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..evaluate import downstream_metrics, reconstruction_metrics
from ..identity import evaluate_identity
from ..report import Comparison, GatePlot, Plots, ProbingSection, SAEMetrics
from ..saes import SAE, JumpRule, RationalSAE
from ..stats import quantile
from ..train import sample_pre_acts
from .progress import RunContext
from .state import UpgradeState

COMPARISONS = (("rsae_init", "teacher"), ("rsae", "teacher"), ("rsae", "control"), ("control", "teacher"))
"""The (a, b) pairs of ``Report.comparisons``."""


def comparison_table(
    metrics: dict[str, SAEMetrics], paired: dict[str, dict[str, float | None]]
) -> dict[str, Comparison]:
    """``Report.comparisons``: for each pair (a, b) of :data:`COMPARISONS` present in ``metrics``,
    ``mse_rel`` = MSE_a / MSE_b - 1 and, when CE was evaluated, ``delta_ce_diff`` (nats/token) and its
    sequence-clustered standard error ``delta_ce_diff_se`` from ``paired``
    (:func:`rsae.evaluate.downstream_metrics`, keyed "a-b" or "b-a", the latter negated)."""
    out: dict[str, Comparison] = {}
    for a, b in COMPARISONS:
        if a not in metrics or b not in metrics:
            continue
        row: dict[str, float | None] = {"mse_rel": metrics[a].mse / metrics[b].mse - 1.0}
        if f"{a}-{b}" in paired:
            row["delta_ce_diff"], row["delta_ce_diff_se"] = paired[f"{a}-{b}"]["diff"], paired[f"{a}-{b}"]["se"]
        elif f"{b}-{a}" in paired:
            row["delta_ce_diff"], row["delta_ce_diff_se"] = -paired[f"{b}-{a}"]["diff"], paired[f"{b}-{a}"]["se"]
        out[f"{a}-{b}"] = Comparison(**row)
    return out


def _histogram(vals: torch.Tensor, lo: float, hi: float, bins: int, of: str) -> dict[str, Any]:
    counts, edges = torch.histogram(vals.float().cpu().clamp(lo, hi), bins=bins)
    return {"edges": edges.tolist(), "counts": counts.long().tolist(), "log": True, "of": of}


def _per_token_plot(
    rsae_init: RationalSAE, rsae: RationalSAE, h: torch.Tensor, theta: torch.Tensor, bins: int
) -> GatePlot:
    """Per-token thresholds (TopK): pooled u = h / tau_i, where the teacher is u H(u - 1) and the RSAE
    G(a u) / a (a: the anchor)."""
    u_all = (h / theta).reshape(-1)
    lo, hi = quantile(u_all, 0.0005), max(quantile(u_all, 0.99995), 2.5)
    grid = torch.linspace(lo, hi, 400, device=h.device)
    c = rsae.jump_anchor

    def curve(sae: RationalSAE) -> list[float]:
        return (sae.elementwise_gate(c * grid[:, None].expand(-1, h.shape[1]))[:, 0] / c).tolist()

    return GatePlot(
        h=grid.tolist(),
        teacher=(grid * (grid > 1.0)).tolist(),
        rsae_init=curve(rsae_init),
        rsae=curve(rsae),
        latent=None,
        theta=1.0,
        x_label="h / tau_i (per-token threshold)",
        note="TopK, per-token threshold: x = h / tau_i, gates divided by tau_i (same for all tokens)",
        hist=_histogram(u_all, lo, hi, bins, "all (token, latent) pre-activations / tau_i"),
    )


def _latent_plot(
    teacher: SAE, rsae_init: RationalSAE, rsae: RationalSAE, h: torch.Tensor, theta: torch.Tensor | None, bins: int
) -> GatePlot:
    """No jump (ReLU): the shared gate over pooled h. Per-latent thresholds: the latent with the median
    threshold among latents active on these tokens, over its own h range (others differ by their scale)."""
    if theta is None:
        j, vals = 0, h.reshape(-1)
    else:
        cand = torch.nonzero((teacher.gate(h) != 0).any(0)).flatten()
        if cand.numel() == 0:
            cand = torch.arange(h.shape[1], device=h.device)
        order = theta[cand].argsort()
        j = int(cand[order[order.numel() // 2]])
        vals = h[:, j]
    lo, hi = quantile(vals, 0.0005), quantile(vals, 0.9995)
    if theta is not None:
        hi = max(hi, 2.5 * float(theta[j]))
    grid = torch.linspace(lo, hi, 400, device=h.device)
    cols = grid[:, None].expand(-1, h.shape[1])
    teacher_curve = torch.relu(grid) if theta is None else grid * (grid > theta[j])
    return GatePlot(
        h=grid.tolist(),
        teacher=teacher_curve.tolist(),
        rsae_init=rsae_init.gate(cols)[:, j].tolist(),
        rsae=rsae.gate(cols)[:, j].tolist(),
        latent=None if theta is None else j,
        theta=None if theta is None else float(theta[j]),
        note=(
            "shared gate, all latents"
            if theta is None
            else f"latent {j} (median threshold among active latents); other latents differ by their scale"
        ),
        hist=_histogram(vals, lo, hi, bins, "all (token, latent) pre-activations" if theta is None else f"latent {j}"),
    )


def gate_plot(
    teacher: SAE, rsae_init: RationalSAE, rsae: RationalSAE, h: torch.Tensor, rule: JumpRule, bins: int = 120
) -> GatePlot:
    """Data of the gate figure: teacher vs RSAE gates over the real pre-activation range ``h`` [n, d_sae]
    (``rule``: the family's jump rule on ``h``), plus a histogram of ``bins`` bins."""
    with torch.no_grad():
        if rule.per_token:
            return _per_token_plot(rsae_init, rsae, h, rule.theta, bins)
        return _latent_plot(teacher, rsae_init, rsae, h, rule.theta, bins)


def probe(state: UpgradeState, saes: dict[str, SAE]) -> ProbingSection | None:
    """k-sparse probing of every SAE on the data set's labels (None when unlabelled or disabled)."""
    cfg, train, evals = state.cfg, state.train, state.evals
    if not cfg.eval.probe_ks or cfg.eval.probe_train_sequences == 0:
        return None
    _, tr_labels = train.sequences(cfg.eval.probe_train_sequences)
    _, ev_labels = evals.sequences()
    if (tr_labels >= 0).sum() < 10 or len(set((ev_labels[ev_labels >= 0]).tolist())) < 2:
        state.notes.append("sparse probing skipped: the data set has too few labelled sequences")
        return None
    from ..probing import probe_sae

    out: dict[str, Any] = {"ks": cfg.eval.probe_ks, "train_sequences": cfg.eval.probe_train_sequences, "by_sae": {}}
    for i, (name, sae) in enumerate(saes.items()):
        res = probe_sae(
            sae,
            train,
            evals,
            ks=cfg.eval.probe_ks,
            max_sequences=cfg.eval.probe_train_sequences,
            seed=cfg.seed,
            dense=(i == 0),
        )
        out["by_sae"][name] = res["sae"]
        if i == 0:
            out["dense_baseline"] = res["dense"]
            out["activations_top_k"] = res["activations_top_k"]
    return ProbingSection(**out)


def add_downstream(
    state: UpgradeState, ctx: RunContext, saes: dict[str, SAE], metrics: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float | None]]:
    """Add CE / KL fields to ``metrics`` (name -> dict of an SAE's metrics; :func:`rsae.evaluate.downstream_metrics`
    on ``eval.ce_sequences`` held-out sequences of ``state.evals``, at the state's hook site); return the paired
    differences ("a-b" -> ``{"diff", "se"}``, nats/token). Nothing is added when ``eval.ce_sequences`` is 0.

    Raises:
        ModelError / HookError: a site the host model does not have."""
    cfg = state.cfg
    if cfg.eval.ce_sequences <= 0:
        return {}
    ids, _ = state.evals.sequences(cfg.eval.ce_sequences)
    model, _ = state.host_model()
    ds = downstream_metrics(
        model,
        cfg.layer,
        saes,
        ids,
        hook=cfg.hook,
        batch_size=cfg.eval.batch_size,
        device=state.device,
        on_progress=ctx.progress.within(0.0, 0.8),
    )
    for k in saes:
        metrics[k].update(
            ce_clean=ds["clean"]["ce"],
            ce_zero=ds["zero"]["ce"],
            ce_spliced=ds[k]["ce_spliced"],
            delta_ce=ds[k]["delta_ce"],
            delta_ce_se=ds[k]["delta_ce_se"],
            loss_recovered=ds[k]["loss_recovered"],
            kl=ds[k]["kl"],
            kl_zero=ds["zero"]["kl"],
            ce_tokens=ds["clean"]["tokens"],
        )
    return ds["paired"]


def evaluate(state: UpgradeState, ctx: RunContext) -> None:
    """Fill ``state.metrics`` (per SAE), ``state.paired``, ``state.probing``, ``state.plots`` and
    ``state.identity`` (its per-latent arrays written to ``state.work_dir``)."""
    saes: dict[str, SAE] = {"teacher": state.teacher, "rsae_init": state.rsae_init, "rsae": state.rsae}
    if state.control is not None:
        state.control.eval()
        saes["control"] = state.control
    metrics: dict[str, dict[str, Any]] = {
        "teacher": state.teacher_metrics.model_dump(),
        "rsae_init": state.init_metrics.model_dump(),
    }
    for k in saes:
        if k not in metrics:
            metrics[k] = reconstruction_metrics(saes[k], state.evals.iter_ordered(2048))
    state.paired = add_downstream(state, ctx, saes, metrics)
    state.probing = probe(state, saes)
    for k in saes:
        if state.probing is not None:
            metrics[k]["probe_accuracy"] = state.probing.by_sae[k]["k"]
    state.metrics = {k: SAEMetrics(**{f: v for f, v in m.items() if v is not None}) for k, m in metrics.items()}
    x = state.train.load(min(state.cfg.calibrate.tokens, 2048)).to(state.device)
    with torch.no_grad():
        h = sample_pre_acts(state.teacher, x)
        rule = state.family.jump_rule(state.teacher, h, state.cfg.remez)
        state.plots = Plots(gate=gate_plot(state.teacher, state.rsae_init, state.rsae, h, rule))
    others = {"rsae": state.rsae, "control": state.control}
    state.identity = evaluate_identity(state.teacher, others, state.evals, state.work_dir)
