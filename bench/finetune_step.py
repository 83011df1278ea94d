"""Benchmark 1, fine-tuning throughput: the RSAE's training step as ``rsae.train.train_sae`` runs it vs SAELens's
training step (``SAETrainer.step``) for the same architecture, built from the same weights, on the same batch.

For each family (ReLU -> SAELens ``StandardTrainingSAE``, JumpReLU -> ``JumpReLUTrainingSAE``, TopK ->
``TopKTrainingSAE``) a teacher is built whose latents fire on ``l0`` of ``d_sae`` latents per token on the batch
(ReLU: per-latent biases at the matching quantile; JumpReLU: per-latent thresholds there; TopK: k = l0). The RSAE
is the teacher with a rational gate from the relaxed Remez fit (ReLU (5, 4); jump families (9, 8) with the jump at
c = 0.25), its exact-zero floor set so that its L0 equals the teacher's (``rsae.pipeline.calibrate.set_floor``,
as calibration does; TopK: the top-k cap, floor 0). The SAELens peer gets the teacher's weights (and thresholds).

Our peer is the real ``train_sae`` loop (Adam groups from ``RationalSAE.param_groups``, the L0 controller,
gradient clipping, the lr schedule) driven one step per call from a helper thread, so the figure is the step the
pipeline runs, whatever options ``train_sae`` gains (a ``path`` keyword, when it exists, is benchmarked per value).
SAELens's peer is ``SAETrainer.step`` (forward, dead-latent bookkeeping, backward, clipping, Adam, schedulers).

Figures per (family, batch, d_sae, peer): tokens/s (median of interleaved steps), peak RSS of one step above the
RSS before it, and the fraction of the dense GEMM roofline (the step's 5 GEMMs, 10 d_in d_sae FLOPs per token,
timed as one more peer in the same interleaved rounds: ``bench.common.gemm5``).

    .venv/bin/python bench/finetune_step.py [--quick] [--families relu,topk] [--d-sae 2304,16384]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import threading
from typing import Any, Callable, Iterator

try:
    from bench.common import bench_device, device_sync, figure, gemm5, interleaved, peak_during
except ModuleNotFoundError:  # run as a script: bench/ is on the path, the repository root is added by common
    from common import bench_device, device_sync, figure, gemm5, interleaved, peak_during  # type: ignore[no-redef]

import torch

BENCH = "finetune_step"
FAMILIES = ("relu", "jumprelu", "topk")
FULL = {"d_in": 576, "d_sae": (2304, 16384), "batch": (1024, 4096), "l0": 48, "rounds": 5, "warmup": 1}
QUICK = {"d_in": 64, "d_sae": (256,), "batch": (128,), "l0": 8, "rounds": 2, "warmup": 1}


class _FixedStore:
    """The part of :class:`rsae.activations.ActivationStore` that ``train_sae`` reads: the same batch forever."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.d_in, self.rows = x, x.shape[1], x.shape[0]

    def iter_batches(self, batch_size: int, *, seed: int = 0, epochs: int | None = None, device: str = "cpu"):
        """``x`` [batch, d_in] on ``device``, forever (``batch_size``, ``seed`` and ``epochs`` are ignored)."""
        x = self.x.to(device)
        while True:
            yield x


class _Stop(Exception):
    """Raised inside ``train_sae``'s ``on_step`` to end a driven run early."""


class TrainSaeDriver:
    """Runs ``rsae.train.train_sae`` in a helper thread, one optimizer step per call of the driver.

    Args:
        sae: trained in place. x: the batch [batch, d_in] every step sees. steps: an upper bound on the calls.
        kwargs: passed to ``train_sae`` (lr, l1_coefficient, param_groups, l0_target, ...).

    Raises (from a call): whatever ``train_sae`` raised; RuntimeError after ``steps`` calls.
    """

    def __init__(self, sae, x: torch.Tensor, steps: int, **kwargs: Any) -> None:
        from rsae.train import train_sae

        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None
        self.stop = False
        self.calls, self.steps = 0, steps
        self.parts: dict[str, float] = {}

        def on_step(step: int, parts: dict[str, float]) -> None:
            self.parts = parts
            self.done.release()
            if step < steps:
                self.go.acquire()
                if self.stop:
                    raise _Stop

        def target() -> None:
            self.go.acquire()
            try:
                if not self.stop:
                    train_sae(sae, _FixedStore(x), steps=steps, batch_size=x.shape[0], on_step=on_step, **kwargs)
            except _Stop:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = e
                self.done.release()

        self.thread = threading.Thread(target=target, daemon=True, name="train_sae-driver")
        self.thread.start()

    def __call__(self) -> dict[str, float]:
        """Run one step; return its loss parts (``loss``, ``mse``, ``l1``, ``l0``, ``lambda``)."""
        if self.calls >= self.steps:
            raise RuntimeError(f"driver was built for {self.steps} steps")
        self.calls += 1
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error
        return self.parts

    def close(self) -> None:
        """End the helper thread (the run stops at its next step boundary)."""
        self.stop = True
        self.go.release()
        self.thread.join(timeout=60)


def _per_latent_kth(h: torch.Tensor, frac: float) -> torch.Tensor:
    """Per-latent value [d_sae] above which a fraction ``frac`` of the rows of ``h`` [n, d_sae] lie."""
    k = max(1, min(h.shape[0], int(round((1.0 - frac) * h.shape[0]))))
    return h.kthvalue(k, dim=0).values


def activations(batch: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Synthetic residual-like activations [batch, d_in]: a shared mean direction plus Gaussian noise, norms near
    those of SmolLM2's middle layers (~95), 1.6% of rows scaled by 5 (the outlier tokens of real-inputs.md)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d_in, generator=g) * 2.0
    x = mean + torch.randn(batch, d_in, generator=g) * (95.0 / math.sqrt(d_in))
    out = torch.rand(batch, generator=g) < 0.016
    x[out] *= 5.0
    return x


def build_peers(family: str, x: torch.Tensor, d_sae: int, l0: int) -> dict[str, Any]:
    """The teacher, the RSAE and the SAELens training SAE of ``family`` at ``d_sae`` on batch ``x``.

    Returns ``{"teacher", "rsae", "saelens", "lam", "l0_target", "teacher_l0", "rsae_l0"}``.
    """
    from rsae.pipeline.calibrate import set_floor
    from rsae.pipeline.initialize import jump_anchor
    from rsae.remez import remez_fit
    from rsae.saes import JumpReLUSAE, RationalSAE, ReLUSAE, TopKSAE

    d_in = x.shape[1]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d_sae, d_in, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    mean = x.mean(0)
    cls = {"relu": ReLUSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE}[family]
    teacher = cls(d_in, d_sae, **({"k": l0} if family == "topk" else {}))
    with torch.no_grad():
        teacher.W_dec.copy_(w * 0.1)
        teacher.W_enc.copy_(w.T)
        teacher.b_dec.copy_(mean)
        teacher.b_enc.zero_()
        h0 = teacher.pre_acts(x)
        edge = _per_latent_kth(h0, l0 / d_sae)
        if family == "relu":
            teacher.b_enc.copy_(-edge)
        elif family == "jumprelu":
            teacher.log_threshold.copy_(edge.clamp_min(1e-3).log())
        teacher.eval()
        h = teacher.pre_acts(x)
        teacher_l0 = (teacher.encode(x) != 0).sum(-1).float().mean().item()
    if family == "relu":
        fit = remez_fit("relu", p=5, q=4)
        c_in = max(h.abs().flatten()[:: max(1, h.numel() // (1 << 22))].quantile(0.999).item(), 1e-6)
        rsae = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=c_in, c_out=c_in, floor=fit.max_error)
    else:
        c, margin = 0.25, 0.025
        fit = remez_fit(family, c=c, p=9, q=8, margin=margin)
        anchor = jump_anchor(c, margin, "upper_edge")
        rational = {"jump": c, "anchor": anchor}
        if family == "jumprelu":
            scale = teacher.threshold.detach() / anchor
            rsae = RationalSAE.from_teacher(
                teacher, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0, scale=scale, rational=rational
            )
        else:
            rsae = RationalSAE.from_teacher(
                teacher, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0, rational={**rational, "topk_k": l0, "topk_cap": True}
            )
    with torch.no_grad():
        if family != "topk":
            set_floor(rsae, h, teacher_l0)
        z = teacher.encode(x)
        mse0 = (x - teacher.decode(z)).pow(2).sum(-1).mean().item()
        l1_0 = (z.abs() * teacher.W_dec.norm(dim=1)).sum(-1).mean().item()
        rsae_l0 = (rsae.encode(x) != 0).sum(-1).float().mean().item()
    lam = 0.0 if family == "topk" else 0.1 * mse0 / max(l1_0, 1e-12)
    return {
        "teacher": teacher,
        "rsae": rsae,
        "saelens": saelens_sae(family, teacher, lam, l0),
        "lam": lam,
        "l0_target": None if family == "topk" else 0.95 * teacher_l0,
        "teacher_l0": teacher_l0,
        "rsae_l0": rsae_l0,
    }


def saelens_sae(family: str, teacher, lam: float, k: int):
    """SAELens's training SAE of ``family`` with ``teacher``'s weights (float32, CPU): ``StandardTrainingSAE``
    (L1 coefficient ``lam``, decoder-norm weighted as ours), ``JumpReLUTrainingSAE`` (the teacher's thresholds;
    its default "step" L0 loss), ``TopKTrainingSAE`` (``k``)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = {"d_in": teacher.d_in, "d_sae": teacher.d_sae, "dtype": "float32", "device": bench_device()}
    if family == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=lam))
    elif family == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, l0_coefficient=1.0))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=k))
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(getattr(teacher, n))
        if family == "jumprelu":
            sae.threshold.copy_(teacher.threshold)
    return sae.to(bench_device())


def saelens_step(sae, x: torch.Tensor, steps: int, lr: float = 1e-4) -> Callable[[], Any]:
    """A call running one ``SAETrainer.step(x)`` of SAELens on ``sae`` (Adam at ``lr``, constant schedule)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = SAETrainerConfig(
        total_training_samples=steps * x.shape[0],
        train_batch_size_samples=x.shape[0],
        lr=lr,
        lr_end=lr / 10,  # what LanguageModelSAERunnerConfig sets; unused by the constant schedule
        device=str(x.device),
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    sae.train()

    def step():
        out = trainer.step(x)
        trainer.n_training_steps += 1
        return out

    return step


def rsae_paths() -> list[str | None]:
    """The ``path`` values to benchmark when ``train_sae`` takes one (the sparse-aware step), else [None]."""
    from rsae.train import train_sae

    if "path" in inspect.signature(train_sae).parameters:
        return ["dense", "sparse", "auto"]
    return [None]


def rsae_driver(peers: dict[str, Any], x: torch.Tensor, steps: int, path: str | None) -> TrainSaeDriver:
    """A :class:`TrainSaeDriver` for the RSAE of ``peers`` with the fine-tune stage's defaults (lr 1e-4, gate lr
    1e-3, threshold lr 1e-2, lambda and L0 target as :func:`rsae.pipeline.finetune.finetune_sparsity`)."""
    rsae = peers["rsae"]
    kw: dict[str, Any] = {
        "lr": 1e-4,
        "l1_coefficient": peers["lam"],
        "param_groups": rsae.param_groups(1e-4, 1e-3, 1e-2),
        "l0_target": peers["l0_target"],
        "device": str(x.device),
    }
    if path is not None:
        kw["path"] = path
    return TrainSaeDriver(rsae, x, steps, **kw)


def run(quick: bool = False, families: tuple[str, ...] = FAMILIES, d_saes=None, batches=None) -> list[dict]:
    """All figures of benchmark 1 (see the module docstring); ``quick``: tiny sizes, seconds."""
    p = QUICK if quick else FULL
    d_in = p["d_in"]
    out: list[dict] = []
    for batch in batches or p["batch"]:
        x = activations(batch, d_in)
        for d_sae in d_saes or p["d_sae"]:
            for family in families:
                out += _one(family, x, d_sae, p)
    return out


def _one(family: str, x: torch.Tensor, d_sae: int, p: dict) -> list[dict]:
    """Figures of one (family, batch, d_sae): every RSAE path, SAELens and the 5 dense GEMMs (the roofline),
    interleaved."""
    import copy

    batch, steps = x.shape[0], p["warmup"] + p["rounds"] + 2
    base = build_peers(family, x, d_sae, p["l0"])
    x = x.to(bench_device())
    peers: dict[str, Callable[[], Any]] = {}
    drivers = []
    for path in rsae_paths():
        name = "rsae" if path is None else f"rsae-{path}"
        d = rsae_driver({**base, "rsae": copy.deepcopy(base["rsae"])}, x, steps, path)
        drivers.append(d)
        peers[name] = d
    peers["saelens"] = saelens_step(base["saelens"], x, steps)
    peers["gemm-roofline"] = gemm5(batch, x.shape[1], d_sae, device=bench_device())
    try:
        times = interleaved(peers, rounds=p["rounds"], warmup=p["warmup"], sync=device_sync())
        mem = {n: peak_during(fn)[2] for n, fn in peers.items() if n != "gemm-roofline"}
    finally:
        for d in drivers:
            d.close()
    info = {"family": family, "batch": batch, "d_sae": d_sae, "d_in": x.shape[1], "device": bench_device()}
    info |= {"teacher_l0": base["teacher_l0"], "rsae_l0": base["rsae_l0"]}
    roof = batch / times.pop("gemm-roofline")["wall_s"]
    gflops = roof * 10 * x.shape[1] * d_sae / 1e9
    res = [figure(BENCH, "roofline_tokens_per_s", roof, "tokens/s", **info, gflops=gflops)]
    for n, t in times.items():
        tps = batch / t["wall_s"]
        res.append(figure(BENCH, "tokens_per_s", tps, "tokens/s", peer=n, **info, step_s=t["wall_s"],
                          cpu_s=t["cpu_s"], first_s=t["first_s"], roofline_fraction=tps / roof,
                          peak_rss_bytes=mem[n]))  # fmt: skip
    sl = batch / times["saelens"]["wall_s"]
    for n in times:
        if n != "saelens":
            res.append(figure(BENCH, "speedup_vs_saelens", batch / times[n]["wall_s"] / sl, "x", peer=n, **info))
    return res


def _iter_csv(s: str | None, conv=str) -> Iterator:
    return (conv(v) for v in s.split(",")) if s else iter(())


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--d-sae", default=None, help="comma list (default 2304,16384; quick 256)")
    ap.add_argument("--batch", default=None, help="comma list (default 1024,4096; quick 128)")
    a = ap.parse_args(argv)
    figs = run(
        a.quick,
        tuple(_iter_csv(a.families)),
        tuple(_iter_csv(a.d_sae, int)) or None,
        tuple(_iter_csv(a.batch, int)) or None,
    )
    for f in figs:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
