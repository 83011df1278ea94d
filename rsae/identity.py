"""Latent identity: does latent j of the upgraded SAE still mean what latent j of the teacher meant?

Explanations of a teacher's latents (Neuronpedia dashboards, autointerp labels) carry over to the RSAE only if
each latent keeps its decoder direction, fires on the same tokens and about as often. For every latent j,
on the held-out activations (streamed in batches, never ``[n_tokens, d_sae]`` at once):

- decoder cosine ``cos(W_dec_teacher[j], W_dec[j])`` (rows of ``W_dec`` [d_sae, d_in]); NaN for a zero row;
- activation correlation: Pearson's r over tokens of ``z_teacher[:, j]`` and ``z[:, j]`` (latent activations,
  exact zeros included), from streaming co-moments merged batch by batch (Chan, Golub & LeVeque 1979, "Updating
  formulae and a pairwise algorithm for computing sample variances"), in float64; NaN where either activation
  is constant on these tokens (e.g. it never fired);
- firing rate: the fraction of tokens with ``z[:, j] != 0`` (SAELens's feature density), for the teacher, the
  RSAE and the control; the ratio RSAE / teacher (NaN where neither fired, inf where only the RSAE fired);
- died: fired for the teacher but never for the other SAE on these tokens; born: the reverse.

:func:`latent_identity` computes them, :func:`save_identity` writes the per-latent arrays to
``latent_identity.safetensors`` (:data:`IDENTITY_FILE`), :func:`identity_section` summarises them for
``report.json`` (:class:`rsae.report.LatentIdentitySection`: quantiles, died / born, histograms, a scatter
sample), and :func:`evaluate_identity` does all three for the pipeline's evaluate stage.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from .report import Distribution, Histogram, LatentChange, LatentIdentitySection, LatentScatter
from .saes import SAE

IDENTITY_FILE = "latent_identity.safetensors"
"""Artifact with the per-latent arrays (:func:`save_identity`)."""
IDENTITY_FORMAT = "rsae-latent-identity/1"
"""The ``format`` key of the artifact's safetensors metadata."""
LIST_MAX = 100
"""At most this many died / born latent indices are listed in ``report.json`` (all are in the artifact)."""
SCATTER_MAX = 4096
"""At most this many latents (a seeded sample above it) in the report's firing-rate scatter."""
BATCH_ELEMENTS = 1 << 21
"""Rows per batch x d_sae: bounds the float64 temporaries of one batch (about 6 of them, 16 MiB each)."""


class _RowSource(Protocol):
    def iter_ordered(self, batch_size: int) -> Iterable[torch.Tensor]: ...


def batch_rows(d_sae: int) -> int:
    """Held-out rows per batch for ``d_sae`` latents: ``BATCH_ELEMENTS // d_sae``, clamped to [16, 2048]."""
    return max(16, min(2048, BATCH_ELEMENTS // max(d_sae, 1)))


def decoder_cosines(teacher: SAE, other: SAE, chunk: int = 4096) -> torch.Tensor:
    """``cos(W_dec_teacher[j], W_dec_other[j])`` for every latent j: [d_sae] float64 on CPU, NaN where either
    row is zero. Computed in float64 on the teacher's device, ``chunk`` rows at a time.

    Raises:
        ValueError: the two SAEs differ in ``d_sae`` or ``d_in``.
    """
    a, b = teacher.W_dec.detach(), other.W_dec.detach()
    if a.shape != b.shape:
        raise ValueError(f"W_dec shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    out = []
    for i in range(0, a.shape[0], chunk):
        ra, rb = a[i : i + chunk].double(), b[i : i + chunk].to(a.device).double()
        den = ra.norm(dim=1) * rb.norm(dim=1)
        out.append(torch.where(den > 0, (ra * rb).sum(1) / den, torch.full_like(den, math.nan)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class PearsonSums:
    """Streaming Pearson correlation of d paired columns: merge each batch's means and centred co-moments
    (Chan, Golub & LeVeque 1979), float64, memory O(d) plus one batch.

    Args:
        d: number of columns (latents). device: where the sums live (that of the batches).
    """

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        z = torch.zeros(d, dtype=torch.float64, device=device)
        self.n = 0
        self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.c_ab = (z.clone() for _ in range(5))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch of rows: ``a``, ``b`` [rows, d] (any float dtype)."""
        rows = a.shape[0]
        if rows == 0:
            return
        a, b = a.double(), b.double()
        ma, mb = a.mean(0), b.mean(0)
        da, db = a - ma, b - mb
        n = self.n + rows
        w = self.n * rows / n
        dma, dmb = ma - self.mean_a, mb - self.mean_b
        self.m2_a += (da * da).sum(0) + dma * dma * w
        self.m2_b += (db * db).sum(0) + dmb * dmb * w
        self.c_ab += (da * db).sum(0) + dma * dmb * w
        self.mean_a += dma * (rows / n)
        self.mean_b += dmb * (rows / n)
        self.n = n

    def corr(self) -> torch.Tensor:
        """Pearson's r per column [d] float64 (CPU), NaN where either column is constant (or no rows)."""
        den = (self.m2_a * self.m2_b).sqrt()
        r = torch.where(den > 0, self.c_ab / den, torch.full_like(den, math.nan))
        return r.clamp(-1.0, 1.0).cpu()


@dataclass
class LatentIdentity:
    """Per-latent identity arrays of SAEs against a teacher on ``n_tokens`` held-out tokens.

    Attributes:
        n_tokens: tokens seen. counts: SAE name (``teacher`` and each other) -> firing counts [d_sae] int64.
        decoder_cos, activation_corr: other SAE name -> [d_sae] float64 (NaN where undefined).
    """

    n_tokens: int
    counts: dict[str, torch.Tensor]
    decoder_cos: dict[str, torch.Tensor]
    activation_corr: dict[str, torch.Tensor]

    @property
    def others(self) -> list[str]:
        """The SAEs compared with the teacher, in order."""
        return list(self.decoder_cos)

    def rate(self, name: str) -> torch.Tensor:
        """Firing rate [d_sae] float64: counts / n_tokens."""
        return self.counts[name].double() / self.n_tokens

    def ratio(self, name: str) -> torch.Tensor:
        """Firing rate of ``name`` / the teacher's [d_sae]: NaN where neither fired, inf where only ``name``."""
        return self.rate(name) / self.rate("teacher")

    def died(self, name: str) -> torch.Tensor:
        """[d_sae] bool: fired for the teacher, never for ``name``."""
        return (self.counts["teacher"] > 0) & (self.counts[name] == 0)

    def born(self, name: str) -> torch.Tensor:
        """[d_sae] bool: never fired for the teacher, fired for ``name``."""
        return (self.counts["teacher"] == 0) & (self.counts[name] > 0)


@torch.no_grad()
def latent_identity(teacher: SAE, others: Mapping[str, SAE], batches: Iterable[torch.Tensor]) -> LatentIdentity:
    """Compare each SAE of ``others`` (e.g. ``{"rsae": ..., "control": ...}``) with ``teacher`` latent by latent.

    Args:
        teacher: the teacher SAE. others: SAEs with the teacher's ``d_in`` and ``d_sae``, latent j meaning
            latent j (an RSAE or a control fine-tuned from the teacher).
        batches: held-out activations x [rows, d_in], streamed (one batch of latents ``[rows, d_sae]`` per SAE
            in memory at a time; :func:`batch_rows` gives a size).

    Returns:
        :class:`LatentIdentity` (tensors on CPU).

    Raises:
        ValueError: no rows in ``batches``, a name ``teacher`` in ``others``, or SAEs of different sizes.
    """
    if "teacher" in others:
        raise ValueError("'teacher' cannot name one of the other SAEs")
    cos = {k: decoder_cosines(teacher, sae) for k, sae in others.items()}
    device = teacher.W_dec.device
    d = teacher.d_sae
    counts = {k: torch.zeros(d, dtype=torch.int64, device=device) for k in ("teacher", *others)}
    sums = {k: PearsonSums(d, device) for k in others}
    n = 0
    for x in batches:
        x = x.to(device)
        zt = teacher.encode(x)
        counts["teacher"] += (zt != 0).sum(0)
        for k, sae in others.items():
            z = sae.encode(x.to(sae.W_dec.device)).to(device)
            counts[k] += (z != 0).sum(0)
            sums[k].update(zt, z)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no held-out rows to compare latents on")
    return LatentIdentity(
        n_tokens=n,
        counts={k: v.cpu() for k, v in counts.items()},
        decoder_cos=cos,
        activation_corr={k: s.corr() for k, s in sums.items()},
    )


def save_identity(ident: LatentIdentity, path: str | os.PathLike[str]) -> Path:
    """Write the per-latent arrays to ``path`` (safetensors, atomically: temp file + rename).

    Tensors, [d_sae] each: ``firing_count.<sae>`` int64 and ``firing_rate.<sae>`` float64 for ``teacher`` and
    each other SAE; per other SAE ``decoder_cos.<sae>``, ``activation_corr.<sae>``, ``firing_rate_ratio.<sae>``
    float64 (NaN / inf as in :class:`LatentIdentity`) and ``died.<sae>``, ``born.<sae>`` bool. Metadata:
    ``format`` (:data:`IDENTITY_FORMAT`), ``n_tokens``, ``teacher``, ``others`` (comma-separated).
    """
    t: dict[str, torch.Tensor] = {}
    for k in ("teacher", *ident.others):
        t[f"firing_count.{k}"] = ident.counts[k]
        t[f"firing_rate.{k}"] = ident.rate(k)
    for k in ident.others:
        t[f"decoder_cos.{k}"] = ident.decoder_cos[k]
        t[f"activation_corr.{k}"] = ident.activation_corr[k]
        t[f"firing_rate_ratio.{k}"] = ident.ratio(k)
        t[f"died.{k}"], t[f"born.{k}"] = ident.died(k), ident.born(k)
    meta = {"format": IDENTITY_FORMAT, "n_tokens": str(ident.n_tokens), "teacher": "teacher"}
    meta["others"] = ",".join(ident.others)
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp), metadata=meta)
    os.replace(tmp, dest)
    return dest


def load_identity(path: str | os.PathLike[str]) -> LatentIdentity:
    """Read a file written by :func:`save_identity` back into a :class:`LatentIdentity`.

    Raises:
        ValueError: the file is not an identity artifact (no ``format`` metadata of :data:`IDENTITY_FORMAT`).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != IDENTITY_FORMAT:
        raise ValueError(f"{path} is not a latent identity file ({IDENTITY_FORMAT})")
    t = load_file(str(path))
    others = [k for k in meta["others"].split(",") if k]
    return LatentIdentity(
        n_tokens=int(meta["n_tokens"]),
        counts={k: t[f"firing_count.{k}"] for k in ("teacher", *others)},
        decoder_cos={k: t[f"decoder_cos.{k}"] for k in others},
        activation_corr={k: t[f"activation_corr.{k}"] for k in others},
    )


# -- the report section ------------------------------------------------------------------------------------


def distribution(values: torch.Tensor) -> Distribution:
    """Mean, min, max and the 5/25/50/75/95% quantiles of the finite entries of ``values`` (any shape)."""
    v = values.reshape(-1).double()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return Distribution(n=0)
    q = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return Distribution(
        n=v.numel(),
        mean=v.mean().item(),
        min=v.min().item(),
        q05=q[0],
        q25=q[1],
        median=q[2],
        q75=q[3],
        q95=q[4],
        max=v.max().item(),
    )


def _share(mask: torch.Tensor, among: torch.Tensor) -> float | None:
    """Share of ``among`` (bool [d]) where ``mask`` holds, None when ``among`` is empty."""
    k = int(among.sum())
    return None if k == 0 else int((mask & among).sum()) / k


def _top(mask: torch.Tensor, key: torch.Tensor, limit: int) -> list[int]:
    """Indices where ``mask``, largest ``key`` first (ties by index), at most ``limit``."""
    idx = torch.nonzero(mask).flatten()
    order = torch.argsort(-key[idx].double(), stable=True)
    return idx[order][:limit].tolist()


def latent_change(ident: LatentIdentity, name: str, listed_max: int = LIST_MAX) -> LatentChange:
    """The :class:`rsae.report.LatentChange` summary of ``name`` against the teacher."""
    cos, corr, ratio = ident.decoder_cos[name], ident.activation_corr[name], ident.ratio(name)
    fired = ident.counts["teacher"] > 0
    died, born = ident.died(name), ident.born(name)
    defined = torch.isfinite(corr)
    return LatentChange(
        decoder_cos=distribution(cos),
        activation_corr=distribution(corr),
        corr_undefined=int((~defined).sum()),
        firing_rate_ratio=distribution(ratio[fired]),
        share_decoder_cos_at_least_0_9=_share(cos >= 0.9, torch.isfinite(cos)),
        share_corr_at_least_0_9=_share(corr >= 0.9, defined),
        share_rate_within_2x=_share((ratio >= 0.5) & (ratio <= 2.0), fired),
        died=int(died.sum()),
        born=int(born.sum()),
        died_latents=_top(died, ident.counts["teacher"], listed_max),
        born_latents=_top(born, ident.counts[name], listed_max),
    )


def _histogram(values: Mapping[str, torch.Tensor], edges: torch.Tensor, of: str, log: bool) -> dict[str, Histogram]:
    """One histogram per SAE of the finite ``values`` on the shared ``edges`` (values clamped into range)."""
    out = {}
    for k, v in values.items():
        v = v.double()
        v = v[torch.isfinite(v)].clamp(float(edges[0]), float(edges[-1]))
        counts, _ = torch.histogram(v, bins=edges)
        out[k] = Histogram(edges=edges.tolist(), counts=counts.long().tolist(), log=log, of=of)
    return out


def _similarity_edges(values: Mapping[str, torch.Tensor], bins: int = 50) -> torch.Tensor:
    """Shared edges for cosines / correlations: from the smallest finite value (floored to 0.1, >= -1) to 1."""
    finite = [v[torch.isfinite(v)] for v in values.values()]
    lo = min((float(v.min()) for v in finite if v.numel()), default=0.0)
    lo = max(-1.0, min(0.9, math.floor(lo * 10) / 10))
    return torch.linspace(lo, 1.0, bins + 1, dtype=torch.float64)


def _scatter(ident: LatentIdentity, limit: int, seed: int) -> LatentScatter:
    d = ident.counts["teacher"].numel()
    if d > limit:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(d, generator=g)[:limit].sort().values
    else:
        idx = torch.arange(d)
    rsae = "rsae" if "rsae" in ident.counts else ident.others[0]
    return LatentScatter(
        latents=idx.tolist(),
        teacher=ident.counts["teacher"][idx].tolist(),
        rsae=ident.counts[rsae][idx].tolist(),
        sampled=d > limit,
    )


def identity_section(
    ident: LatentIdentity,
    artifact: str = IDENTITY_FILE,
    *,
    listed_max: int = LIST_MAX,
    scatter_max: int = SCATTER_MAX,
    seed: int = 0,
) -> LatentIdentitySection:
    """The ``report.json`` section (:class:`rsae.report.LatentIdentitySection`) of ``ident``: distributions,
    died / born with the first ``listed_max`` indices, histograms of decoder cosines and correlations (50
    shared bins up to 1) and of log10 firing rates (10 bins per decade from log10(1 / n_tokens) to 0), and the
    firing counts of at most ``scatter_max`` latents (a ``seed``-ed sample above it).

    Raises:
        ValueError: ``ident`` compares no SAE with the teacher.
    """
    if not ident.others:
        raise ValueError("the latent identity compares no SAE with the teacher")
    names = ("teacher", *ident.others)
    lo = math.floor(math.log10(1.0 / ident.n_tokens))
    density_edges = torch.linspace(lo, 0.0, -lo * 10 + 1, dtype=torch.float64)
    logs = {k: ident.rate(k)[ident.counts[k] > 0].log10() for k in names}
    return LatentIdentitySection(
        n_tokens=ident.n_tokens,
        d_sae=ident.counts["teacher"].numel(),
        artifact=artifact,
        listed_max=listed_max,
        firing_rate={k: distribution(ident.rate(k)) for k in names},
        dead={k: int((ident.counts[k] == 0).sum()) for k in names},
        vs_teacher={k: latent_change(ident, k, listed_max) for k in ident.others},
        decoder_cos_hist=_histogram(
            ident.decoder_cos, _similarity_edges(ident.decoder_cos), "cos(W_dec_teacher[j], W_dec[j])", True
        ),
        activation_corr_hist=_histogram(
            ident.activation_corr,
            _similarity_edges(ident.activation_corr),
            "Pearson r of latent j's activations (teacher vs this SAE) over held-out tokens",
            True,
        ),
        density_hist=_histogram(logs, density_edges, "log10 firing rate of the latents that fired", False),
        scatter=_scatter(ident, scatter_max, seed),
    )


def evaluate_identity(
    teacher: SAE, others: Mapping[str, SAE | None], rows: _RowSource, folder: str | os.PathLike[str]
) -> LatentIdentitySection:
    """The evaluate stage's latent identity: compare ``others`` (None entries skipped) with ``teacher`` on the
    held-out rows of ``rows`` (an :class:`rsae.activations.ActivationStore`, in storage order, batches of
    :func:`batch_rows`), write ``folder / IDENTITY_FILE`` and return the report section.

    Raises:
        ValueError: as :func:`latent_identity`.
    """
    saes: dict[str, Any] = {k: v for k, v in others.items() if v is not None}
    ident = latent_identity(teacher, saes, rows.iter_ordered(batch_rows(teacher.d_sae)))
    save_identity(ident, Path(folder) / IDENTITY_FILE)
    return identity_section(ident)
