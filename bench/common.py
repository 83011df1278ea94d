"""Shared pieces of the benchmark suite (``bench/run_all.py``): the machine, memory high-water marks, interleaved
timing of peers, and the measured GEMM roofline.

Method (issue 14): peers run in the same process and are timed interleaved (A, B, A, B, ...) after their
warm-up, and the figures are medians, so that load from other processes on a shared machine hits every peer
alike. Memory is the resident-set high-water mark from ``/proc/self/status`` (``VmHWM``), reset before each
measured call by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0, ``Documentation/filesystems/proc.rst``)
after returning freed heap to the OS (glibc ``malloc_trim``); ``tracemalloc`` does not see torch's allocations.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repository root
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` as a fallback)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU model, logical cores, torch threads, RAM, load average, GPU (if
    any), the versions of Python, torch, transformers and sae-lens, and the UTC date (ISO 8601)."""
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    mem_total = None
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem_total = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": mem_total,
        "load_avg_1m": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "sae_lens": version("sae-lens"),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


def bench_device() -> str:
    """The torch device the benchmarks run on: ``$RSAE_BENCH_DEVICE`` (``bench/gpu.sh`` sets ``cuda``), default
    ``cpu``."""
    return os.environ.get("RSAE_BENCH_DEVICE") or "cpu"


def device_sync() -> Callable[[], None]:
    """A call that waits for the bench device's queued work (``torch.cuda.synchronize`` on CUDA, else a no-op)."""
    import torch

    return torch.cuda.synchronize if bench_device().startswith("cuda") else (lambda: None)


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so that a high-water mark sees the next call's own peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def rss_bytes() -> int:
    """Current resident set size of this process, bytes (``VmRSS``)."""
    return _status_kib("VmRSS") * 1024


def rss_peak_bytes() -> int:
    """Resident-set high-water mark of this process since start or the last :func:`reset_peak`, bytes (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs`` = 5); False where the kernel refuses."""
    malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_during(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn()`` once; return (its result, the process's peak RSS during the call in bytes, the peak above the
    RSS at entry in bytes). Where ``VmHWM`` cannot be reset the peak is the process's lifetime high-water mark."""
    reset_peak()
    base = rss_bytes()
    out = fn()
    peak = rss_peak_bytes()
    return out, peak, max(0, peak - base)


def interleaved(
    peers: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Time ``peers`` (name -> a call doing one unit of work) in the same process, interleaved.

    Each peer first runs ``warmup`` untimed calls (one peer after the other: the first call may compile); then
    ``rounds`` rounds call every peer once, in the given order, timing wall clock (``time.perf_counter``) and
    process CPU (``time.process_time``). ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read.

    Returns:
        name -> ``{"wall_s": median wall seconds, "cpu_s": median CPU seconds, "walls": [...], "first_s": wall
        seconds of the first warm-up call (None without warm-up)}``.
    """
    sync = sync or (lambda: None)
    out: dict[str, dict[str, Any]] = {n: {"walls": [], "cpus": [], "first_s": None} for n in peers}
    for n, fn in peers.items():
        for i in range(warmup):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i == 0:
                out[n]["first_s"] = time.perf_counter() - t0
    for _ in range(rounds):
        for n, fn in peers.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            out[n]["walls"].append(time.perf_counter() - w0)
            out[n]["cpus"].append(time.process_time() - c0)
    for r in out.values():
        r["wall_s"] = statistics.median(r["walls"]) if r["walls"] else float("nan")
        r["cpu_s"] = statistics.median(r["cpus"]) if r["cpus"] else float("nan")
        del r["cpus"]
    return out


def gemm_gflops(m: int, k: int, n: int, *, repeats: int = 5, device: str = "cpu", dtype=None) -> float:
    """Measured float32 (or ``dtype``) matmul throughput of ``[m, k] @ [k, n]`` on ``device``, GFLOP/s
    (2 m k n FLOPs per product; median of ``repeats`` after one warm-up)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def gemm5(batch: int, d_in: int, d_sae: int, *, device: str = "cpu") -> Callable[[], None]:
    """A call running the 5 dense GEMMs of one SAE training step at these shapes, each at its own layout:
    forward encoder ``x @ W_enc`` and decoder ``z @ W_dec``; backward ``z^T @ g`` (dL/dW_dec), ``g @ W_dec^T``
    (dL/dz) and ``x^T @ dh`` (dL/dW_enc); the input needs no gradient. 2 ``batch`` ``d_in`` ``d_sae`` FLOPs each,
    ``10 d_in d_sae`` FLOPs per token: timed beside the peers, it is the dense GEMM roofline of the step."""
    import torch

    x = torch.randn(batch, d_in, device=device)
    w_enc = torch.randn(d_in, d_sae, device=device)
    w_dec = torch.randn(d_sae, d_in, device=device)
    h = torch.randn(batch, d_sae, device=device)
    g = torch.randn(batch, d_in, device=device)

    def run() -> None:
        x @ w_enc
        h @ w_dec
        h.T @ g
        g @ w_dec.T
        x.T @ h

    return run


def sae_step_roofline(batch: int, d_in: int, d_sae: int, *, device: str = "cpu", repeats: int = 3) -> dict[str, float]:
    """The dense GEMM roofline of one SAE training step at these shapes, timed alone (:func:`gemm5`; repeated to
    >= ~20 ms per sample, median of ``repeats``).

    Returns:
        ``{"gemm_s": seconds of the 5 GEMMs, "gflops": their GFLOP/s, "tokens_per_s": batch / gemm_s,
        "flops_per_token": 10 d_in d_sae}``.
    """
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn = gemm5(batch, d_in, d_sae, device=device)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    reps = max(1, min(1000, int(0.02 / max(time.perf_counter() - t0, 1e-7))))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        ts.append((time.perf_counter() - t0) / reps)
    total = statistics.median(ts)
    flops = 10.0 * batch * d_in * d_sae
    return {
        "gemm_s": total,
        "gflops": flops / total / 1e9,
        "tokens_per_s": batch / total,
        "flops_per_token": flops / batch,
    }


def figure(bench: str, name: str, value: float | int | None, unit: str, **params: Any) -> dict[str, Any]:
    """One figure of a benchmark's ``run()`` list: ``{"bench", "name", "value", "unit", **params}``."""
    return {"bench": bench, "name": name, "value": value, "unit": unit, **params}


def quick_cli(run: Callable[[bool], list[dict]], doc: str | None, argv: list[str] | None = None) -> None:
    """The command line of a benchmark whose only option is ``--quick``: run it and print one JSON line per
    figure (``doc``: the module docstring, whose first paragraph is the description)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    for f in run(ap.parse_args(argv).quick):
        print(json.dumps(f))
