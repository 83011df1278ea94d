"""Implementation of :func:`rsae.pipeline.run_upgrade`, one function per stage.

Stages (``rsae.config.STAGES``): extract -> init -> calibrate -> finetune -> evaluate -> package.
Extracted activation folders are reused when their manifest matches the request, so a restarted job
does not extract twice.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import copy
import time
from pathlib import Path
from typing import Any

import torch

from .activations import MANIFEST, ActivationStore, extract_activations
from .config import UpgradeConfig
from .device import pick_device
from .errors import TeacherError
from .evaluate import downstream_metrics, reconstruction_metrics
from .models import check_layer, load_model
from .pipeline import _Progress, write_json_atomic
from .rational import RationalSAE
from .remez import cached_remez_fit
from .report import Report, SAEMetrics, headline
from .sae import WEIGHTS_NAME, SAE, load_sae, sha256_file
from .train import calibrate_gate, sample_pre_acts, set_floor, train_sae

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("relu",)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("rsae-service", "torch", "transformers", "scipy", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _quantile(x: torch.Tensor, q: float, max_n: int = 4_000_000, seed: int = 0) -> float:
    flat = x.reshape(-1)
    if flat.numel() > max_n:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (max_n,), generator=g)]
    return torch.quantile(flat.float(), q).item()


def _acts(cfg: UpgradeConfig, model, tok, split: str, n: int, folder: Path, dev: str, prog: _Progress,
          lo: float, hi: float) -> ActivationStore:
    want = {"layer": cfg.layer, "rows": n, "ctx_len": cfg.data.ctx_len, "dataset": cfg.data.dataset,
            "split": split, "eval_fraction": cfg.data.eval_fraction, "seed": cfg.seed, "model": cfg.model}
    mf = folder / MANIFEST
    if mf.is_file():
        have = json.loads(mf.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            log.info("reusing %s activations in %s", split, folder)
            prog.report(hi)
            return ActivationStore(folder)
    extract_activations(model, tok, layer=cfg.layer, dataset=cfg.data.dataset, split=split, n_tokens=n,
                        out_dir=folder, ctx_len=cfg.data.ctx_len, eval_fraction=cfg.data.eval_fraction,
                        seed=cfg.seed, batch_size=cfg.data.batch_size, shard_tokens=cfg.data.shard_tokens,
                        device=dev, meta={"model": cfg.model},
                        on_progress=lambda f: prog.report(lo + (hi - lo) * f))
    return ActivationStore(folder)


def _batches(store: ActivationStore, batch: int, max_rows: int | None = None):
    n = 0
    for s in store.iter_shards():
        a = s["acts"]
        for i in range(0, a.shape[0], batch):
            if max_rows is not None and n >= max_rows:
                return
            b = a[i:i + batch]
            if max_rows is not None:
                b = b[: max_rows - n]
            n += b.shape[0]
            yield b


def _load_teacher(cfg: UpgradeConfig) -> SAE:
    teacher = load_sae(cfg.teacher)
    if isinstance(teacher, RationalSAE):
        raise TeacherError("the teacher is already a rational SAE", field="teacher")
    if cfg.family is not None and cfg.family != teacher.family:
        raise TeacherError(f"family {cfg.family!r} requested but the teacher's cfg says {teacher.family!r}",
                           field="family")
    if teacher.family not in SUPPORTED_FAMILIES:
        raise TeacherError(f"teacher family {teacher.family!r} not supported yet; supported: "
                           f"{SUPPORTED_FAMILIES}", field="teacher")
    return teacher


def run(cfg: UpgradeConfig, out_dir: Path, work_dir: Path | None, prog: _Progress) -> dict[str, Any]:
    """Run all stages; see :func:`rsae.pipeline.run_upgrade` for the contract."""
    timings: dict[str, float] = {}
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = work_dir or out_dir.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    teacher = _load_teacher(cfg).to(dev)
    notes: list[str] = []

    # -- extract -------------------------------------------------------------------------------------
    t0 = time.time()
    prog.enter("extract")
    model, tok = load_model(cfg.model, device=dev)
    check_layer(model, cfg.layer)
    d_model = model.config.hidden_size
    if teacher.d_in != d_model:
        raise TeacherError(f"teacher d_in={teacher.d_in} but model {cfg.model!r} has hidden size {d_model}",
                           field="teacher")
    tmeta_hook = teacher.metadata.get("hook_name")
    if tmeta_hook and tmeta_hook != cfg.hook:
        notes.append(f"teacher cfg names hook {tmeta_hook!r}; this upgrade reads {cfg.hook!r}")
    train = _acts(cfg, model, tok, "train", cfg.data.train_tokens, work / "acts-train", dev, prog, 0.0, 0.8)
    evals = _acts(cfg, model, tok, "eval", cfg.data.eval_tokens, work / "acts-eval", dev, prog, 0.8, 1.0)
    timings["extract"] = time.time() - t0

    # -- init: Remez fit + copy of the teacher --------------------------------------------------------
    t0 = time.time()
    prog.enter("init")
    r = cfg.remez
    fit = cached_remez_fit(teacher.family, c=0.0, p=r.p, q=r.q, grid_points=r.grid_points, margin=r.margin,
                           tol=r.tol, max_iter=r.max_iter)
    x_cal = train.load(cfg.calibrate.tokens).to(dev)
    h = sample_pre_acts(teacher, x_cal)
    c_in = max(_quantile(h.abs(), cfg.calibrate.c_in_quantile, seed=cfg.seed), 1e-6)
    rsae = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=c_in, c_out=c_in,
                                    rational={"jump": 0.0, "fit_max_error": fit.max_error}).to(dev)
    timings["init"] = time.time() - t0
    prog.report(1.0)

    # -- calibrate: gate scalars only, weights frozen ---------------------------------------------------
    t0 = time.time()
    prog.enter("calibrate")
    target = teacher.gate(h).detach()
    with torch.no_grad():
        pre_loss = (rsae.gate_fn.raw(h) - target).pow(2).mean().item()
    cal_losses = calibrate_gate(rsae, h, target, steps=cfg.calibrate.steps, lr=cfg.calibrate.lr, seed=cfg.seed,
                                on_step=lambda s, l: prog.report(s / max(1, cfg.calibrate.steps)))
    floor = set_floor(rsae, h, target != 0)
    del h, target
    m_teacher = reconstruction_metrics(teacher, _batches(evals, 2048))
    m_init = reconstruction_metrics(rsae, _batches(evals, 2048))
    rsae_init = copy.deepcopy(rsae).eval()
    prog.report(1.0, {"stage": "calibrate", "teacher_mse": m_teacher["mse"], "teacher_l0": m_teacher["l0"],
                      "rsae_init_mse": m_init["mse"], "rsae_init_l0": m_init["l0"]})
    timings["calibrate"] = time.time() - t0

    # -- finetune: all parameters -----------------------------------------------------------------------
    t0 = time.time()
    prog.enter("finetune")
    ft = cfg.finetune
    lam = ft.l1_coefficient
    lam_source = "request"
    if lam is None and isinstance(teacher.metadata.get("l1_coefficient"), (int, float)):
        lam, lam_source = float(teacher.metadata["l1_coefficient"]), "teacher cfg metadata.l1_coefficient"
    if lam is None:
        with torch.no_grad():
            z = teacher.encode(x_cal)
            mse0 = (x_cal - teacher.decode(z)).pow(2).sum(-1).mean().item()
            l1_0 = (z.abs() * teacher.W_dec.norm(dim=1)).sum(-1).mean().item()
        lam, lam_source = 0.1 * mse0 / max(l1_0, 1e-12), "auto: L1 term = 10% of teacher MSE"
    del x_cal
    gate_params = [rsae.gate_fn.a, rsae.gate_fn.b, rsae.gate_fn.log_c_in, rsae.gate_fn.log_c_out]
    gate_ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in rsae.parameters() if id(p) not in gate_ids], "lr": ft.lr},
              {"params": gate_params, "lr": ft.gate_lr}]
    curve: list[dict[str, float]] = []
    eval_rows = min(evals.rows, 4096)

    def on_step(step: int, parts: dict[str, float]) -> None:
        if step % ft.eval_every == 0 or step == ft.steps:
            rsae.eval()
            m = reconstruction_metrics(rsae, _batches(evals, 2048, eval_rows))
            rsae.train()
            point = {"step": step, "train_mse": parts["mse"], "train_l0": parts["l0"],
                     "eval_mse": m["mse"], "eval_l0": m["l0"], "eval_fvu": m["fvu"]}
            curve.append(point)
            prog.report(step / ft.steps, point)
        else:
            prog.report(step / ft.steps)

    hist = train_sae(rsae, train, steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr, l1_coefficient=lam,
                     seed=cfg.seed + 1, device=dev, param_groups=groups, on_step=on_step)
    timings["finetune"] = time.time() - t0

    # -- evaluate ------------------------------------------------------------------------------------------
    t0 = time.time()
    prog.enter("evaluate")
    m_rsae = reconstruction_metrics(rsae, _batches(evals, 2048))
    metrics = {"teacher": m_teacher, "rsae_init": m_init, "rsae": m_rsae}
    if cfg.eval.ce_sequences > 0:
        ids, _ = evals.sequences(cfg.eval.ce_sequences)
        ds = downstream_metrics(model, cfg.layer, {"teacher": teacher, "rsae_init": rsae_init, "rsae": rsae}, ids,
                                batch_size=cfg.eval.batch_size, device=dev,
                                on_progress=lambda f: prog.report(f))
        for k in ("teacher", "rsae_init", "rsae"):
            metrics[k].update(ce_clean=ds["clean"]["ce"], ce_zero=ds["zero"]["ce"], ce_spliced=ds[k]["ce_spliced"],
                              delta_ce=ds[k]["delta_ce"], loss_recovered=ds[k]["loss_recovered"],
                              kl=ds[k]["kl"], ce_tokens=ds["clean"]["tokens"])
    timings["evaluate"] = time.time() - t0

    # -- package -------------------------------------------------------------------------------------------
    t0 = time.time()
    prog.enter("package")
    teacher_w = Path(cfg.teacher) / WEIGHTS_NAME
    provenance = {"source": str(cfg.teacher), "sha256": sha256_file(teacher_w),
                  "architecture": teacher.architecture, "family": teacher.family, "d_in": teacher.d_in,
                  "d_sae": teacher.d_sae, "l1_coefficient": teacher.metadata.get("l1_coefficient")}
    rsae.metadata = {**teacher.metadata, "model_name": cfg.model, "hook_name": cfg.hook, "hook_layer": cfg.layer,
                     "teacher": provenance, "method": "rsae (Yin & Yu 2026, arXiv 2606.14990)",
                     "upgrade_config": cfg.model_dump(mode="json"), "versions": _versions()}
    rsae.cpu().save(out_dir)
    sm = {k: SAEMetrics(**v) for k, v in metrics.items()}
    notes += [
        "Position 0 of every sequence (attention sink) is excluded from activations and metrics.",
        "FVU is pooled about the per-dimension mean; fvu_about_zero divides by sum x^2.",
        f"{evals.manifest['stats']['frac_norm_above_3x_median_sample']:.2%} of held-out tokens (sample) have "
        "residual norm > 3x the median; they are kept and weigh heavily in MSE and FVU.",
    ]
    g = rsae.gate_fn
    report = Report(
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        config=cfg.model_dump(mode="json"),
        host_model={"name": cfg.model, "layer": cfg.layer, "hook": cfg.hook, "d_model": d_model,
                    "n_layers": model.config.num_hidden_layers, "device": dev},
        teacher=provenance,
        data={"train": {k: train.manifest[k] for k in ("rows", "ctx_len", "dataset", "split", "stats")},
              "eval": {k: evals.manifest[k] for k in ("rows", "ctx_len", "dataset", "split", "stats")}},
        remez={k: v for k, v in fit.__dict__.items()},
        calibration={"steps": cfg.calibrate.steps, "tokens": cfg.calibrate.tokens, "loss_before": pre_loss,
                     "loss_after": cal_losses[-1] if cal_losses else pre_loss, "c_in_init": c_in,
                     "floor": floor, "floor_rule": "99.99th percentile of phi(h) on teacher-inactive entries"},
        finetune={"steps": ft.steps, "batch_size": ft.batch_size, "lr": ft.lr, "gate_lr": ft.gate_lr,
                  "l1_coefficient": lam, "l1_source": lam_source, "curve": curve,
                  "final_train": hist[-1] if hist else None,
                  "gate": {"a": g.a.tolist(), "b": g.b.tolist(), "c_in": g.c_in.item(), "c_out": g.c_out.item(),
                           "floor": g.floor.item()}},
        metrics=sm,
        headline=headline(sm),
        eval_split={"model": cfg.model, "layer": cfg.layer, "dataset": cfg.data.dataset, "split": "eval",
                    "eval_fraction": cfg.data.eval_fraction, "seed": cfg.seed, "ctx_len": cfg.data.ctx_len,
                    "eval_tokens": cfg.data.eval_tokens},
        notes=notes,
        timings_s={**{k: round(v, 2) for k, v in timings.items()}, "package": round(time.time() - t0, 2)},
        versions=_versions(),
    )
    data = json.loads(report.model_dump_json())
    data["timings_s"]["package"] = round(time.time() - t0, 2)
    write_json_atomic(out_dir / "report.json", data)
    prog.report(1.0, {"stage": "package", **{k: v for k, v in data["headline"].items() if v is not None}},
                force=True)
    return data
