"""Small statistics on tensors shared by the families and the pipeline."""

from __future__ import annotations

import torch


def quantile(x: torch.Tensor, q: float, max_n: int = 4_000_000, seed: int = 0) -> float:
    """The ``q`` quantile (in [0, 1]) of all entries of ``x`` (any shape), as a float in x's units.

    ``torch.quantile`` refuses inputs above 2^24 entries, so above ``max_n`` entries a seeded uniform sample
    (with replacement) of ``max_n`` entries is used.
    """
    flat = x.reshape(-1)
    if flat.numel() > max_n:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (max_n,), generator=g)]
    return torch.quantile(flat.float(), q).item()
