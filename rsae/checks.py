"""Whether a teacher SAE that reads fine can be upgraded: pure checks shared by the API (at upload, before a
teacher gets an id) and the pipeline (when it loads the teacher, and on the first real activations).

Three causes, each a typed :class:`rsae.errors.TeacherError` whose message names the cause and a hint:

- :class:`~rsae.errors.InvalidThresholdsError`: per-latent thresholds theta that are not finite or below
  :data:`MIN_THRESHOLD` (a source threshold <= 0 is read as the smallest normal float32 by
  :mod:`rsae.formats`). The RSAE places latent j's jump with the scale s_j = theta_j / a
  (``rsae.pipeline.initialize``) and evaluates its rational at t = a h / theta_j; for theta_j -> 0 that
  overflows float32 (the degree-9 numerator overflows once |t| > ~1.9e4), so such a teacher ran the whole
  pipeline and failed at packaging with ``non_finite_weights``. On real data, :func:`check_rational_init`
  catches thresholds that are positive but still too small for the actual pre-activations.
- :class:`~rsae.errors.NonFiniteTeacherError`: the forward pass (pre-activations, latents, reconstruction)
  is not finite on the probe batch (:func:`probe_inputs`, per-coordinate RMS 1 and
  :data:`FINITE_MAX_SCALE`) or on the real activations: e.g. float32 weights of 1e30 whose products
  overflow.
- :class:`~rsae.errors.DeadTeacherError`: no latent is live. Statically (:func:`teacher_problems`): a live
  latent needs a non-zero decoder row and must fire on some probe input, over a wide range of scales
  (:data:`PROBE_SCALES`) and directions (random ones and the teacher's own decoder rows, both signs). On
  data (:func:`check_activations`): at least one latent must fire on the calibration tokens. An upgrade of a
  dead teacher used to end ``succeeded`` with L0 0.

The probe batch is synthetic: a teacher that passes may still fail on real data, which is why the pipeline
repeats the checks where it first sees activations (:meth:`rsae.pipeline.state.UpgradeState.calibration_data`).
"""

from __future__ import annotations

import math

import torch

from .errors import DeadTeacherError, InvalidThresholdsError, NonFiniteTeacherError, NumericalError, TeacherError
from .saes import SAE

MIN_THRESHOLD = 1e-8
"""Smallest per-latent threshold (units of h) accepted for an upgrade. The RSAE evaluates its rational at
t = a h / theta (a ~ 0.05-0.55, the jump anchor); with theta < 1e-8 any pre-activation above ~4e-4 gives
|t| > 1.9e4, where the degree-9 numerator overflows float32."""
PROBE_SCALES: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
"""Per-coordinate RMS of the probe inputs around ``b_dec`` (units of x) for the liveness check."""
FINITE_MAX_SCALE = 10.0
"""The forward must be finite on probe inputs of per-coordinate RMS 1 and this (real activations are O(1-10))."""
PROBE_DIRECTIONS = 8
"""Unit directions of the probe batch (half random, half the teacher's decoder rows); each used with both signs."""
_MAX_PROBE_ELEMENTS = 1 << 22
"""Rows x d_sae of one probe chunk (16 MiB of float32), so very wide teachers stay cheap."""


def probe_directions(sae: SAE, *, directions: int = PROBE_DIRECTIONS, seed: int = 0) -> torch.Tensor:
    """Unit probe directions u [2 * directions, d_in], float32 on the teacher's device: ``directions // 2``
    random Gaussian directions and the normalised decoder rows of ``directions - directions // 2`` random
    latents whose row is not zero (random ones instead when there are none), then all of them negated."""
    g = torch.Generator().manual_seed(seed)
    w_dec = sae.W_dec.detach().float().cpu()
    n_rand = directions // 2
    rand = torch.randn(n_rand, sae.d_in, generator=g)
    norms = w_dec.norm(dim=1)
    live = torch.nonzero(norms > 0).flatten()
    n_dec = directions - n_rand
    if live.numel():
        pick = live[torch.randint(live.numel(), (n_dec,), generator=g)]
        dec = w_dec[pick] / norms[pick, None]
    else:
        dec = torch.randn(n_dec, sae.d_in, generator=g)
    u = torch.cat([rand, dec])
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
    u = torch.nan_to_num(u)  # a non-finite decoder row gives a zero direction; the forward check reports it
    return torch.cat([u, -u]).to(sae.W_enc.device)


def probe_inputs(sae: SAE, scale: float, *, directions: int = PROBE_DIRECTIONS, seed: int = 0) -> torch.Tensor:
    """Probe activations x = b_dec + scale * sqrt(d_in) * u [2 * directions, d_in] (per-coordinate RMS
    ``scale`` around the teacher's ``b_dec``, the SAE's own centre) for the directions of :func:`probe_directions`."""
    u = probe_directions(sae, directions=directions, seed=seed)
    return sae.b_dec.detach().float() + scale * math.sqrt(sae.d_in) * u


def _chunks(x: torch.Tensor, d_sae: int) -> list[torch.Tensor]:
    rows = max(1, _MAX_PROBE_ELEMENTS // max(1, d_sae))
    return list(x.split(rows))


def _threshold_problem(sae: SAE, field: str) -> TeacherError | None:
    theta = getattr(sae, "threshold", None)
    if not isinstance(theta, torch.Tensor):
        return None
    theta = theta.detach().float()
    bad = ~torch.isfinite(theta) | (theta < MIN_THRESHOLD)
    if not bad.any():
        return None
    n = int(bad.sum())
    worst = float(theta[bad].nan_to_num(nan=math.inf).min())
    return InvalidThresholdsError(
        f"{n} of {sae.d_sae} latent thresholds are non-finite or below {MIN_THRESHOLD:g} (smallest {worst:.3g}; "
        "a threshold <= 0 in the file is read as 1.2e-38). The RSAE places each latent's jump at theta_j and "
        "evaluates its rational gate at a * h / theta_j, which overflows float32 for such thresholds. Hint: a "
        "latent with threshold <= 0 is a ReLU latent; give every latent a positive threshold (e.g. its smallest "
        "firing pre-activation) or upload the teacher as a ReLU SAE",
        field=f"{field}.threshold",
    )


def _forward_problem(sae: SAE, field: str) -> TeacherError | None:
    for scale in (1.0, FINITE_MAX_SCALE):
        for x in _chunks(probe_inputs(sae, scale), sae.d_sae):
            h = sae.pre_acts(x)
            z = sae.gate(h)
            x_hat = sae.decode(z)
            for name, t in (("pre-activations", h), ("latents", z), ("reconstruction", x_hat)):
                if not torch.isfinite(t).all():
                    return NonFiniteTeacherError(
                        f"the teacher's forward pass gives NaN or Inf ({name}) on probe activations of "
                        f"per-coordinate RMS {scale:g} around b_dec (largest |W_enc| "
                        f"{float(sae.W_enc.detach().abs().max()):.3g}, |W_dec| "
                        f"{float(sae.W_dec.detach().abs().max()):.3g}): the weights overflow float32. Hint: "
                        "rescale or re-export the teacher; an upgrade of it cannot produce finite weights",
                        field=field,
                    )
    return None


def _dead_problem(sae: SAE, field: str) -> TeacherError | None:
    w_dec_live = sae.W_dec.detach().abs().sum(dim=1) > 0  # [d_sae]
    if w_dec_live.any():
        u = probe_directions(sae)
        with torch.no_grad():
            base = sae.pre_acts(sae.b_dec.detach().float()[None])  # h at x = b_dec, [1, d_sae]
            for uc in _chunks(u, sae.d_sae):
                lin = uc @ sae.W_enc.detach().float() * math.sqrt(sae.d_in)  # d h / d scale, [rows, d_sae]
                for scale in PROBE_SCALES:
                    z = sae.gate(base + scale * lin)
                    if ((z != 0) & w_dec_live).any():
                        return None
    n_dec = int((~w_dec_live).sum())
    n_enc = int((sae.W_enc.detach().abs().sum(dim=0) == 0).sum())
    b = sae.b_enc.detach()
    return DeadTeacherError(
        f"no latent of the teacher is live: {n_dec} of {sae.d_sae} latents have an all-zero decoder row, {n_enc} an "
        "all-zero encoder column, and none fires on probe activations of per-coordinate RMS "
        f"{PROBE_SCALES[0]:g} to {PROBE_SCALES[-1]:g} around b_dec (random directions and the teacher's own "
        f"decoder rows; b_enc in [{float(b.min()):.3g}, {float(b.max()):.3g}]). An upgrade would end with L0 0. "
        "Hint: this is not a trained SAE (check the file, the b_enc sign and the thresholds)",
        field=field,
    )


@torch.no_grad()
def teacher_problems(sae: SAE, *, field: str = "teacher") -> list[TeacherError]:
    """Everything that stops ``sae`` from being upgraded, without data, most fundamental first: invalid
    thresholds (:class:`~rsae.errors.InvalidThresholdsError`, field ``<field>.threshold``), a non-finite forward
    on the probe batch (:class:`~rsae.errors.NonFiniteTeacherError`), no live latent
    (:class:`~rsae.errors.DeadTeacherError`); see the module docstring for the rules.

    Args:
        sae: a loaded teacher (any family; thresholds are checked where it has a ``threshold`` tensor [d_sae]).
        field: the input the errors name (``"teacher"`` in a job; the upload's weights field in the API).

    Returns:
        The problems found (empty: upgradable as far as the weights can tell). Cost: about 16 + 32 forward
        rows of the teacher (chunked to 16 MiB).
    """
    problems = [_threshold_problem(sae, field), _forward_problem(sae, field)]
    if problems[1] is None:  # liveness is meaningless when the forward is not finite
        problems.append(_dead_problem(sae, field))
    return [p for p in problems if p is not None]


def check_teacher(sae: SAE, *, field: str = "teacher") -> None:
    """Raise the first of :func:`teacher_problems` (``sae`` and ``field`` as there).

    Raises:
        InvalidThresholdsError, NonFiniteTeacherError, DeadTeacherError: see :func:`teacher_problems`.
    """
    problems = teacher_problems(sae, field=field)
    if problems:
        raise problems[0]


@torch.no_grad()
def check_activations(
    teacher: SAE, h: torch.Tensor, z: torch.Tensor, *, where: str = "the calibration tokens", field: str = "teacher"
) -> None:
    """The data-dependent half of :func:`check_teacher`: the teacher on real activations.

    Args:
        teacher: the teacher (for its width in messages).
        h: its pre-activations [n, d_sae] on real activations; z: its latents g(h) [n, d_sae].
        where: what the rows are, for the message.
        field: the input the errors name.

    Raises:
        NonFiniteTeacherError: h or z holds NaN or Inf.
        DeadTeacherError: no entry of z is non-zero (no latent fires on any of the n tokens).
    """
    for name, t in (("pre-activations", h), ("latents", z)):
        if not torch.isfinite(t).all():
            raise NonFiniteTeacherError(
                f"the teacher's {name} are NaN or Inf on {h.shape[0]} of {where} ({int((~torch.isfinite(t)).sum())} "
                "entries): its weights overflow float32 on these activations. Hint: check that the teacher was "
                "trained on this model and layer, or rescale it",
                field=field,
            )
    if not (z != 0).any():
        raise DeadTeacherError(
            f"no latent of the teacher fires on {h.shape[0]} of {where} (all {teacher.d_sae} latents are dead "
            f"here; pre-activations at most {float(h.max()):.3g}). An upgrade would end with L0 0. Hint: the "
            "teacher does not match these activations: check the model, the layer / hook the teacher was "
            "trained on, and its b_enc and thresholds",
            field=field,
        )


@torch.no_grad()
def check_rational_init(z: torch.Tensor, h: torch.Tensor, teacher: SAE, *, field: str = "teacher") -> None:
    """After the RSAE is initialised from the teacher: its latents ``z`` [n, d_sae] on the calibration rows
    (teacher pre-activations ``h`` [n, d_sae]) must be finite.

    Raises:
        InvalidThresholdsError: not finite and the teacher has thresholds (the per-latent scales theta_j / a
            put a h / theta_j beyond float32; the message gives the offending latents' largest |h| / theta).
        NumericalError: not finite otherwise (this check runs at init, so the job fails there, not at packaging).
    """
    bad = ~torch.isfinite(z).all(dim=0)
    if not bad.any():
        return
    theta = getattr(teacher, "threshold", None)
    n = int(bad.sum())
    if isinstance(theta, torch.Tensor):
        th = theta.detach().to(h.device)[bad]
        ratio = float((h[:, bad].abs().amax(dim=0) / th).max())
        raise InvalidThresholdsError(
            f"the RSAE's rational gate overflows float32 at initialisation for {n} latents: their thresholds "
            f"(smallest {float(th.min()):.3g}) are tiny compared with their pre-activations (largest |h| / theta "
            f"{ratio:.3g}). Hint: these latents behave like ReLU latents; raise their thresholds or upload the "
            "teacher as a ReLU SAE. Lowering the learning rates does not help",
            field=f"{field}.threshold",
        )
    raise NumericalError(
        f"the RSAE initialised from the teacher is not finite on the calibration tokens ({n} latents); the gate "
        "fit or the teacher's scale is degenerate",
        field=field,
    )
