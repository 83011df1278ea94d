"""RSAE fine-tuning step: the dense autograd step vs the sparse-aware step (``rsae.sparse``), by density.

One training step as ``rsae.train.train_sae`` runs it (loss -> backward -> clip -> Adam) on an RSAE with the
ReLU family's rational gate (Remez fit, degrees (5, 4)), its floor set so that the batch has the wanted L0
(latents per token), at d_in 576. Paths, each on its own copy of the same model and the same batch:

- ``autograd``: autograd on ``rsae.saes.sae_loss`` (the step before ``rsae.sparse``; ``path="dense"``);
- ``dense``: ``rsae.sparse.SparseStep("dense")``, the same node with its products as GEMMs (4 GEMMs, no
  input gradient, against autograd's 6);
- ``sparse``: ``rsae.sparse.SparseStep("sparse")``, decoder and gradients from the active entries only;
- ``saelens`` (when ``sae_lens`` imports): SAELens's ``StandardTrainingSAE.training_forward_pass`` (ReLU,
  L1 scaled by decoder norms) with the same weights and batch, plus the same backward / Adam step: the step
  a user would train this SAE with instead. Its cost does not depend on the RSAE's L0.

After one warm-up step per path (it contains the ``torch.compile`` of the gate kernels for large batches),
the timed steps run interleaved round-robin so that load from other processes hits all paths alike; the
rows give medians. Columns: ``ms`` / ``cpu_ms`` median wall / process-CPU time per step, ``tokens_per_s``
= batch / wall, ``x_autograd`` / ``x_saelens`` = that path's tokens/s over autograd's / SAELens's in the same
configuration, ``peak_mib`` = peak RSS of one extra step above the RSS before it, ``density`` = nnz / (batch
d_sae) measured on the batch. Learning rate 1e-6 so that the L0 stays at its target during the run.

    .venv/bin/python bench/sparse_step.py            # full: d_sae 2,304 and 16,384, batch 1,024 and 4,096
    .venv/bin/python bench/sparse_step.py --quick    # smoke test, seconds
    .venv/bin/python bench/sparse_step.py --d-sae 2304 --batch 4096 --l0 20,50,70 --steps 5

Prints one JSON line per row and a table; :func:`run` returns the rows (``bench/run_all.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from rsae.remez import remez_fit
from rsae.saes import RationalSAE, ReLUSAE, sae_loss
from rsae.sparse import SPARSE_MAX_DENSITY, SparseStep

try:  # run as a module of the bench folder or as a script
    from .gate_step import PeakRSS, cpu_model
except ImportError:  # pragma: no cover - script mode
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gate_step import PeakRSS, cpu_model

D_IN = 576
L0S_RSAE = (20, 50, 70)
"""L0 of the RSAEs of default upgrades (latents per token, d_sae 2,304)."""
DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.35)
"""Further densities (nnz / (batch d_sae)) to show the crossover."""
LR = 1e-6
LAM = 1e-3


def make_rsae(d_in: int, d_sae: int, x: torch.Tensor, l0: float, seed: int = 0) -> RationalSAE:
    """An RSAE with the ReLU family's (5, 4) gate on a tied random init, C_in = C_out = the 99.9th percentile
    of |h| and the floor (r units) at the quantile that gives ``l0`` active latents per row of ``x`` [n, d_in]."""
    g = torch.Generator().manual_seed(seed)
    teacher = ReLUSAE(d_in, d_sae)
    teacher.init_weights(g)
    with torch.no_grad():
        teacher.b_enc.normal_(0.0, 0.01, generator=g)
        h = teacher.pre_acts(x)
        c = float(torch.quantile(h.abs().flatten()[:1_000_000], 0.999))
    fit = remez_fit("relu", p=5, q=4)
    sae = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=c, c_out=c, floor=0.0)
    with torch.no_grad():
        r = sae.gate_unit(h).flatten()
        k = r.numel() - int(round(l0 * x.shape[0]))
        sae.set_floor(float(r.kthvalue(max(1, k)).values) if k > 0 else float(r.min()) - 1.0)
    return sae


def _adam_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1e4)
    opt.step()


def _ours(sae: RationalSAE, loss_fn: Callable) -> Callable[[torch.Tensor], float]:
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)

    def step(x: torch.Tensor) -> float:
        loss, parts = loss_fn(sae, x, LAM)
        _adam_step(params, opt, loss)
        return parts["loss"]

    return step


def _saelens(sae: RationalSAE) -> Callable[[torch.Tensor], float] | None:
    """SAELens's ReLU training step on the RSAE's encoder / decoder weights, or None without sae_lens."""
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    except ImportError:
        return None
    cfg = StandardTrainingSAEConfig(d_in=sae.d_in, d_sae=sae.d_sae, l1_coefficient=LAM, device="cpu")
    sl = StandardTrainingSAE(cfg)
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sl, n).copy_(getattr(sae, n))
    params = [p for p in sl.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)

    def step(x: torch.Tensor) -> float:
        out = sl.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={"l1": LAM}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
            )
        )
        _adam_step(params, opt, out.loss)
        return float(out.loss)

    return step


def measure(d_sae: int, batch: int, l0: float, steps: int, saelens: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """Rows (one per path) for one configuration: interleaved timed steps, medians, one memory step each."""
    x = torch.randn(batch, D_IN, generator=torch.Generator().manual_seed(seed + 1))
    base = make_rsae(D_IN, d_sae, x, l0, seed)
    probe = SparseStep("sparse")
    with torch.no_grad():
        density = float(base.gate_fn.unit(base.pre_acts(x)).gt(base.floor).float().mean())
    paths: dict[str, Callable[[torch.Tensor], float]] = {
        "autograd": _ours(copy.deepcopy(base), sae_loss),
        "dense": _ours(copy.deepcopy(base), SparseStep("dense")),
        "sparse": _ours(copy.deepcopy(base), probe),
    }
    sl = _saelens(base) if saelens else None
    if sl is not None:
        paths["saelens"] = sl
    first, wall, cpu, loss = {}, {k: [] for k in paths}, {k: [] for k in paths}, {}
    for name, fn in paths.items():
        t0 = time.perf_counter()
        fn(x)
        first[name] = time.perf_counter() - t0
    for _ in range(steps):
        for name, fn in paths.items():
            w0, c0 = time.perf_counter(), time.process_time()
            loss[name] = fn(x)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    peak = {}
    for name, fn in paths.items():
        with PeakRSS() as m:
            fn(x)
        peak[name] = m.peak / 2**20
    med = {k: statistics.median(v) for k, v in wall.items()}
    rows = []
    for name in paths:
        tps = batch / med[name]
        rows.append(
            {
                "bench": "sparse_step",
                "path": name,
                "d_in": D_IN,
                "d_sae": d_sae,
                "batch": batch,
                "l0": round(density * d_sae, 1),
                "density": round(density, 4),
                "ms": round(med[name] * 1e3, 1),
                "cpu_ms": round(statistics.median(cpu[name]) * 1e3, 1),
                "first_s": round(first[name], 2),
                "tokens_per_s": round(tps),
                "x_autograd": round(med["autograd"] / med[name], 2),
                "x_saelens": round(med["saelens"] / med[name], 2) if "saelens" in med else None,
                "peak_mib": round(peak[name], 1),
                "loss": loss[name],
                "steps": steps,
            }
        )
    return rows


def configs(quick: bool) -> list[tuple[int, int, float]]:
    """(d_sae, batch, l0) to measure: the RSAE's L0s (20, 50, 70) and :data:`DENSITIES`."""
    if quick:
        return [(2304, 256, 50), (2304, 256, 0.3 * 2304)]
    out = []
    for d_sae in (2304, 16384):
        for batch in (1024, 4096):
            out += [(d_sae, batch, l0) for l0 in L0S_RSAE] + [(d_sae, batch, f * d_sae) for f in DENSITIES]
    return out


def machine_row() -> dict[str, Any]:
    """The machine, threads and versions the rows were measured with."""
    return {
        "bench": "sparse_step",
        "machine": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "sparse_max_density": SPARSE_MAX_DENSITY,
    }


def run(quick: bool = False, steps: int | None = None, saelens: bool = True) -> list[dict[str, Any]]:
    """All rows: quick = 2 configurations at batch 256 (no compile, seconds); full = :func:`configs`.

    Returns a list of row dicts (keys as in the module docstring), the first being a ``machine`` row.
    """
    n = steps or (2 if quick else 5)
    rows = [machine_row()]
    for d_sae, batch, l0 in configs(quick):
        rows += measure(d_sae, batch, l0, n, saelens=saelens)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ("d_sae", "batch", "l0", "density", "path", "ms", "cpu_ms", "tokens_per_s", "x_autograd", "x_saelens")
    lines = ["| " + " | ".join(cols + ("peak_mib",)) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        if "path" in r:
            lines.append("| " + " | ".join(str(r[c]) for c in cols + ("peak_mib",)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``--quick``, or a custom grid with ``--d-sae``, ``--batch``, ``--l0`` (comma lists)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per path (default 5; quick 2)")
    ap.add_argument("--d-sae", default=None, help="comma list (custom grid)")
    ap.add_argument("--batch", default="4096")
    ap.add_argument("--l0", default="20,50,70", help="comma list of L0s; values < 1 are densities")
    ap.add_argument("--no-saelens", action="store_true")
    a = ap.parse_args(argv)
    if a.d_sae:
        rows = [machine_row()]
        for d in map(int, a.d_sae.split(",")):
            for b in map(int, a.batch.split(",")):
                for v in map(float, a.l0.split(",")):
                    rows += measure(d, b, v * d if v < 1 else v, a.steps or 5, saelens=not a.no_saelens)
    else:
        rows = run(quick=a.quick, steps=a.steps, saelens=not a.no_saelens)
    for r in rows:
        print(json.dumps(r))
    print(_table(rows))


if __name__ == "__main__":
    main()
