"""Time one full SAE training step with the ReLU gate vs the rational gate (rsae.kernels), per implementation.

Step: h = x @ W_enc + b_enc -> z = gate(h) -> x_hat = z @ W_dec + b_dec -> MSE + lambda * L1 -> backward ->
Adam step. Every implementation trains its own copy of the same initial model on the same batch; the steps
are interleaved round-robin (relu, eager, fused, compiled, relu, ...) so that load changes on a shared
machine hit all of them alike. The rational gate starts from the relaxed-Remez ReLU fit (rsae.remez) with
C_in = C_out = 99.9th percentile of |h| and floor = the fit's max error (r units).

Columns: first = wall time of the first step (includes torch.compile for "compiled"); wall / cpu = median
wall-clock / process-CPU ms per step after warm-up; ratio = over ReLU's; saved = bytes autograd saves for
backward during one step (saved_tensors_hooks, unique storages) and the same in units of one [batch, d_sae]
float32 tensor; peak = peak RSS during a step above the RSS just before it (sampled every ms, after
malloc_trim), i.e. the step's transient memory.

Run: ``.venv/bin/python bench/gate_step.py --p 9 --q 8 --steps 10`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import threading
import time

import torch

from rsae import kernels
from rsae.remez import remez_fit

try:  # `python -m bench.gate_step` or `python bench/gate_step.py` (bench/ first on the path)
    from bench.common import cpu_model
except ImportError:
    from common import cpu_model  # type: ignore[no-redef]

IMPLS = ("eager", "fused", "compiled")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so RSS deltas see each step's own peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Context manager sampling RSS every ``interval`` s in a thread; ``.peak`` = max RSS - RSS at entry."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval, self.peak = interval, 0

    def __enter__(self):
        malloc_trim()
        self.base = self.top = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            self.top = max(self.top, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.top, rss_bytes()) - self.base


class Model(torch.nn.Module):
    """SAE with a ReLU or rational gate; ``impl`` picks the rational implementation."""

    def __init__(self, d_in: int, d_sae: int, p: int, q: int, scales: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d_sae, d_in, generator=g)
        w = 0.1 * w / w.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(w.clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        fit = remez_fit("relu", p=p, q=q)
        self.a = torch.nn.Parameter(torch.tensor(fit.a, dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.tensor(fit.b, dtype=torch.float32))
        self.log_c_in = torch.nn.Parameter(torch.tensor(0.0))
        self.log_c_out = torch.nn.Parameter(torch.tensor(0.0))
        self.s = torch.nn.Parameter(torch.ones(d_sae)) if scales else None
        self.floor = float(fit.max_error)
        self.impl = "relu"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.impl == "relu":
            z = torch.relu(h)
        else:
            z = kernels.rational_gate(
                h, self.a, self.b, self.log_c_in.exp(), self.log_c_out.exp(), self.s, self.floor, impl=self.impl
            )
        return z @ self.W_dec + self.b_dec, z


def step(model: Model, opt: torch.optim.Optimizer, x: torch.Tensor, lam: float) -> float:
    """One training step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    x_hat, z = model(x)
    loss = (x_hat - x).pow(2).sum(-1).mean() + lam * z.abs().sum(-1).mean()
    loss.backward()
    opt.step()
    return loss.item()


def saved_bytes(model: Model, x: torch.Tensor, lam: float) -> int:
    """Bytes (unique storages) autograd saves for backward during one forward of the step's loss."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_hat, z = model(x)
        loss = (x_hat - x).pow(2).sum(-1).mean() + lam * z.abs().sum(-1).mean()
    del loss, x_hat, z
    return sum(seen.values())


def main(argv: list[str] | None = None) -> None:
    """Parse args, run the interleaved benchmark, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    ap.add_argument("--p", type=int, default=9)
    ap.add_argument("--q", type=int, default=8)
    ap.add_argument("--impl", default="all", help="'all' or a comma list of eager,fused,compiled")
    ap.add_argument("--lam", type=float, default=5.0, help="L1 coefficient")
    ap.add_argument("--scales", action="store_true", help="train per-latent scales s [d_sae] too")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the saved-bytes / peak-RSS measurements")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = IMPLS if args.impl == "all" else tuple(i.strip() for i in args.impl.split(","))
    for i in impls:
        if i not in IMPLS:
            ap.error(f"unknown impl {i!r}; choose from {IMPLS}")
    names = ("relu",) + impls

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {cpu_model()} "
        f"({os.cpu_count()} logical), load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, (p, q) = ({args.p}, {args.q}), "
        f"steps {args.steps} (+{args.warmup} warm-up), lambda {args.lam}, scales {args.scales}"
    )

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    base = Model(args.d_in, args.d_sae, args.p, args.q, args.scales)
    with torch.no_grad():
        h = (x - base.b_dec) @ base.W_enc + base.b_enc
        flat = h.abs().flatten()
        idx = torch.randint(flat.numel(), (min(flat.numel(), 1 << 20),), generator=torch.Generator().manual_seed(0))
        c = torch.quantile(flat[idx], 0.999).item()
        base.log_c_in.fill_(c).log_()
        base.log_c_out.fill_(c).log_()
    del h, flat

    runs = {}
    for n in names:
        m = copy.deepcopy(base)
        m.impl = n
        runs[n] = {"model": m, "opt": torch.optim.Adam(m.parameters(), lr=1e-4), "wall": [], "cpu": []}

    for n in names:  # warm-up, one implementation at a time (the first compiled call compiles)
        r = runs[n]
        for k in range(args.warmup):
            t0 = time.perf_counter()
            step(r["model"], r["opt"], x, args.lam)
            if k == 0:
                r["first"] = time.perf_counter() - t0
                print(f"  warm-up {n:9s} first step {r['first']:7.2f} s", flush=True)
    for _ in range(args.steps):
        for n in names:
            r = runs[n]
            w0, c0 = time.perf_counter(), time.process_time()
            r["loss"] = step(r["model"], r["opt"], x, args.lam)
            r["wall"].append(time.perf_counter() - w0)
            r["cpu"].append(time.process_time() - c0)
    if not args.no_memory:
        h_bytes = args.batch * args.d_sae * 4
        for n in names:
            r = runs[n]
            r["saved"] = saved_bytes(r["model"], x, args.lam)
            with PeakRSS() as pk:
                step(r["model"], r["opt"], x, args.lam)
            r["peak"] = pk.peak
        print(f"  one [batch, d_sae] float32 tensor = {h_bytes / 2**20:.0f} MiB")

    rw = statistics.median(runs["relu"]["wall"]) if args.steps else float("nan")
    rc = statistics.median(runs["relu"]["cpu"]) if args.steps else float("nan")
    print()
    print(
        f"{'impl':9s} {'first s':>8s} {'wall ms':>9s} {'ratio':>6s} {'cpu ms':>9s} {'ratio':>6s} "
        f"{'saved MiB':>10s} {'x h':>5s} {'peak MiB':>9s} {'loss':>10s}"
    )
    for n in names:
        r = runs[n]
        w = statistics.median(r["wall"]) if r["wall"] else float("nan")
        c = statistics.median(r["cpu"]) if r["cpu"] else float("nan")
        mem = (
            ""
            if args.no_memory
            else (f"{r['saved'] / 2**20:10.0f} {r['saved'] / h_bytes:5.1f} {r['peak'] / 2**20:9.0f}")
        )
        print(
            f"{n:9s} {r.get('first', float('nan')):8.2f} {w * 1e3:9.0f} {w / rw:6.2f} {c * 1e3:9.0f} "
            f"{c / rc:6.2f} {mem} {r.get('loss', float('nan')):10.4g}"
        )
    st = kernels.compile_status()
    if st["failed"]:
        print(f"note: torch.compile failed, 'compiled' ran the fused path: {st['failed']}")
    print(f"load avg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
