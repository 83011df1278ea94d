"""Peak resident memory (RSS) of one small upgrade, per stage, at a given d_sae (docs/performance.md, "Memory at
d_sae 16,384").

A random-init ReLU teacher (576 x d_sae, the tied init of :meth:`rsae.saes.SAE.init_weights`) at
``blocks.3.hook_resid_post`` of SmolLM2-135M is upgraded on BBC News with small token counts and few steps (the
sizes below); a background thread samples the process's RSS (psutil) every 10 ms and each stage of
:data:`rsae.pipeline.run.PIPELINE` is wrapped to record the peak RSS while it ran and the RSS when it ended.

    python -m bench.memory_dsae --d-sae 16384 --out /tmp/mem16k.json
    /usr/bin/time -v python -m bench.memory_dsae --d-sae 2304      # the kernel's own peak (Maximum resident)

Prints and writes JSON: ``{"d_sae", "rss_start_mib", "stages": {name: {"peak_mib", "end_mib", "s"}},
"peak_mib", "ru_maxrss_mib"}``. Numbers depend on the machine and allocator; they are recorded in docs/, never
asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

MIB = 1 << 20
SIZES = {
    "data": {"train_tokens": 8192, "eval_tokens": 2048, "ctx_len": 128},
    "calibrate": {"steps": 20, "tokens": 4096, "sample": 8192},
    "finetune": {"steps": 20, "batch_size": 1024, "eval_every": 20, "control": True},
    "eval": {"ce_sequences": 4, "probe_ks": [1, 5], "probe_train_sequences": 16},
}
"""The upgrade's settings: small token counts, few steps, the default batch size and the control on."""


class Sampler:
    """RSS of this process sampled every ``period`` seconds in a daemon thread; ``window()`` restarts the
    running peak and returns the previous one (MiB)."""

    def __init__(self, period: float = 0.01) -> None:
        self.proc, self.period = psutil.Process(), period
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def window(self) -> float:
        """The peak (MiB) since the previous call, then restart it at the current RSS."""
        rss = self.proc.memory_info().rss
        peak, self.peak = max(self.peak, rss), rss
        return peak / MIB

    def stop(self) -> None:
        """End the sampling thread."""
        self._stop.set()
        self._t.join()


def measure(d_sae: int, root: Path) -> dict:
    """Upgrade a random-init ReLU teacher of width ``d_sae`` in ``root``; per-stage RSS (MiB) and seconds."""
    from rsae.config import UpgradeConfig
    from rsae.pipeline import run as run_mod
    from rsae.saes import ReLUSAE

    teacher = ReLUSAE(576, d_sae, metadata={"hook_name": "blocks.3.hook_resid_post", "model_name": "smollm2-135m"})
    teacher.init_weights(torch.Generator().manual_seed(0))
    teacher.save(root / "teacher")
    del teacher
    sampler = Sampler()
    out: dict = {"d_sae": d_sae, "rss_start_mib": round(sampler.window(), 1), "stages": {}}

    def wrap(name, stage):
        def timed(state, ctx):
            sampler.window()
            t0 = time.time()
            stage(state, ctx)
            out["stages"][name] = {
                "peak_mib": round(sampler.window(), 1),
                "end_mib": round(sampler.proc.memory_info().rss / MIB, 1),
                "s": round(time.time() - t0, 1),
            }

        return timed

    for name, stage in list(run_mod.PIPELINE.items()):
        run_mod.PIPELINE[name] = wrap(name, stage)
    cfg = UpgradeConfig(model="smollm2-135m", layer=3, teacher=str(root / "teacher"), **SIZES)
    run_mod.run_upgrade(cfg, root / "out", work_dir=root / "work")
    sampler.stop()
    out["peak_mib"] = max(s["peak_mib"] for s in out["stages"].values())
    out["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    return out


def main() -> None:
    """CLI: ``--d-sae N [--out FILE]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rsae-mem-") as tmp:
        res = measure(a.d_sae, Path(tmp))
    text = json.dumps(res, indent=2)
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
