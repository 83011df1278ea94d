"""The typed state of one upgrade: all that one stage hands the next, and how it is persisted between stages.

:class:`UpgradeState` starts with the request, the teacher and its family (:func:`new_state`); each stage
(:mod:`rsae.pipeline.stages`) reads the fields earlier stages filled and fills its own. After every stage
:func:`rsae.pipeline.run.run_upgrade` persists the state (:meth:`UpgradeState.snapshot`: the stage outputs
as JSON, the SAEs as exact state dicts), so a restarted job continues at the first unfinished stage.
Large derived tensors (the calibration batch and its pre-activations) are not persisted: they are
recomputed on demand, deterministically (:meth:`UpgradeState.calibration_data`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..activations import ActivationStore
from ..checks import check_activations, check_teacher
from ..config import UpgradeConfig
from ..errors import TeacherError
from ..evaluate import eval_batch_size
from ..remez import RationalFit
from ..report import (
    ActivationStorage,
    CalibrationSection,
    ControlSection,
    DataSection,
    FinetuneSection,
    FitParams,
    HostModel,
    LatentIdentitySection,
    Plots,
    ProbingSection,
    SAEMetrics,
)
from ..saes import SAE, SAE_REGISTRY, Family, JumpRule, RationalSAE, family_names, get_family, load_sae
from ..stream import StreamedActivations, open_train
from ..train import sample_pre_acts

log = logging.getLogger(__name__)


@dataclass
class CalibrationData:
    """The teacher on the calibration tokens (recomputable from the training activations).

    Attributes:
        x: activations [n, d_in]; h: teacher pre-activations [n, d_sae]; target: the teacher's gate output
        g(h) [n, d_sae]; active: ``target != 0`` [n, d_sae]; rule: the family's jump rule on ``h``.
    """

    x: torch.Tensor
    h: torch.Tensor
    target: torch.Tensor
    active: torch.Tensor
    rule: JumpRule


@dataclass
class InitResult:
    """Output of the initialize stage besides the RSAE: the Remez fit, its inputs, the initial C_in and the
    jump rule's description and whether the teacher's rank rule caps the active set (TopK cap)."""

    fit: RationalFit
    params: FitParams
    c_in: float
    thresholds: dict[str, Any]
    rank_capped: bool = False


@dataclass
class UpgradeState:
    """Everything the stages share. Fields are filled stage by stage; None means "not yet".

    Attributes:
        cfg: the request. out_dir: artifact folder. work_dir: scratch folder (activations, checkpoints).
        device: torch device. family: the teacher's :class:`rsae.saes.Family` (None only in a standalone
            evaluation of an SAE of no teacher family, :func:`state_for`). teacher: the teacher SAE (on ``device``,
            eval mode; in a standalone evaluation, the SAE evaluated).
        done: stages finished so far, in order. notes: report notes. timings: seconds per finished stage.
        host, train, evals: extract's output (host model description, activation stores).
        init: initialize's output; rsae: the RSAE (initialized, then calibrated, then fine-tuned).
        rsae_init, calibration, teacher_metrics, init_metrics: calibrate's output (a frozen copy of the
            calibrated RSAE, the calibration section, held-out metrics of the teacher and of ``rsae_init``).
        control, finetune, control_section: finetune's output.
        metrics, paired, probing, plots, identity: evaluate's output (``paired``: delta CE differences, "a-b"
            -> ``{"diff", "se"}``; ``identity``: the latent identity section, its per-latent arrays in
            ``work_dir / rsae.identity.IDENTITY_FILE``).
        report: package's output (the report as written to ``report.json``).
    """

    cfg: UpgradeConfig
    out_dir: Path
    work_dir: Path
    device: str
    family: Family | None
    teacher: SAE
    done: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    host: HostModel | None = None
    train: ActivationStore | None = None
    evals: ActivationStore | None = None
    init: InitResult | None = None
    rsae: RationalSAE | None = None
    rsae_init: RationalSAE | None = None
    calibration: CalibrationSection | None = None
    teacher_metrics: SAEMetrics | None = None
    init_metrics: SAEMetrics | None = None
    control: SAE | None = None
    finetune: FinetuneSection | None = None
    control_section: ControlSection | None = None
    metrics: dict[str, SAEMetrics] | None = None
    paired: dict[str, dict[str, float | None]] | None = None
    probing: ProbingSection | None = None
    plots: Plots | None = None
    identity: LatentIdentitySection | None = None
    report: dict[str, Any] | None = None
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _cal: CalibrationData | None = field(default=None, repr=False)

    # -- lazily loaded resources -------------------------------------------------------------------
    def host_model(self) -> tuple[Any, Any]:
        """The host model and tokenizer (loaded on first use in ``settings.model_dtype`` resolved for the device;
        :func:`rsae.models.load_model`, :func:`rsae.models.resolve_dtype`)."""
        if self._model is None:
            from ..models import load_model, resolve_dtype

            dtype = resolve_dtype(self.cfg.model_dtype, self.device)
            self._model, self._tokenizer = load_model(self.cfg.model, device=self.device, dtype=dtype)
        return self._model, self._tokenizer

    def calibration_data(self) -> CalibrationData:
        """The teacher on the first ``cfg.calibrate.tokens`` training rows (computed on first use).

        Raises:
            NonFiniteTeacherError, DeadTeacherError: the teacher is not finite on these rows, or no latent
                fires on any of them (:func:`rsae.checks.check_activations`).
        """
        if self._cal is None:
            x = self.train.load(self.cfg.calibrate.tokens).to(self.device)
            h = sample_pre_acts(self.teacher, x)
            with torch.no_grad():
                target = self.teacher.gate(h).detach()
            site = self.cfg.hook or f"blocks.{self.cfg.layer}.hook_resid_post"  # resolved by new_state
            where = f"the calibration tokens of {self.cfg.model} at {site}"
            check_activations(self.teacher, h, target, where=where)
            rule = self.family.jump_rule(self.teacher, h, self.cfg.remez)
            self._cal = CalibrationData(x, h, target, target != 0, rule)
        return self._cal

    def release_calibration_data(self) -> None:
        """Free the calibration tensors (about 4 x n x d_sae floats)."""
        self._cal = None

    @property
    def data_section(self) -> DataSection:
        """The report's ``data`` section from the two activation manifests (and how the training rows were
        stored: :class:`rsae.report.ActivationStorage`)."""
        keys = ("rows", "ctx_len", "dataset", "split", "stats")
        m, train = self.train.manifest, self.train
        streamed = isinstance(train, StreamedActivations)
        storage = ActivationStorage(
            mode="stream" if streamed else "disk",
            requested=self.cfg.data.activation_storage,
            disk_rows=train.disk_rows if streamed else train.rows,
            buffer_rows=int(train.storage["buffer_rows"]) if streamed else None,
        )
        return DataSection(
            train={k: m[k] for k in keys},
            eval={k: self.evals.manifest[k] for k in keys},
            conventions=m.get("conventions"),
            source=m.get("source"),
            storage=storage,
        )

    # -- persistence -------------------------------------------------------------------------------
    _SAES = ("rsae", "rsae_init", "control")
    _SECTIONS = {
        "host": HostModel,
        "calibration": CalibrationSection,
        "teacher_metrics": SAEMetrics,
        "init_metrics": SAEMetrics,
        "finetune": FinetuneSection,
        "control_section": ControlSection,
        "probing": ProbingSection,
        "plots": Plots,
        "identity": LatentIdentitySection,
    }

    def snapshot(self) -> dict[str, Any]:
        """The persistable state: plain values, pydantic sections as JSON-able dicts, SAEs as
        ``{"cfg", "tensors", "state_dict"}`` (exact; :func:`sae_from_snapshot`). ``torch.load``
        ``weights_only``-safe."""
        snap: dict[str, Any] = {
            "done": list(self.done),
            "notes": list(self.notes),
            "timings": dict(self.timings),
            "paired": self.paired,
            "report": self.report,
        }
        for name, _ in self._SECTIONS.items():
            v = getattr(self, name)
            snap[name] = None if v is None else v.model_dump(mode="json", by_alias=True)
        snap["metrics"] = (
            None if self.metrics is None else {k: m.model_dump(mode="json") for k, m in self.metrics.items()}
        )
        if self.init is not None:
            snap["init"] = {
                "fit": self.init.fit.model_dump(),
                "params": self.init.params.model_dump(mode="json"),
                "c_in": self.init.c_in,
                "thresholds": self.init.thresholds,
                "rank_capped": self.init.rank_capped,
            }
        for name in self._SAES:
            sae = getattr(self, name)
            snap[name] = None if sae is None else sae_snapshot(sae)
        return snap

    def restore(self, snap: dict[str, Any]) -> None:
        """Load a :meth:`snapshot` into this state (activation stores reopened from ``work_dir``)."""
        self.done, self.notes, self.timings = list(snap["done"]), list(snap["notes"]), dict(snap["timings"])
        self.paired, self.report = snap.get("paired"), snap.get("report")
        for name, model in self._SECTIONS.items():
            if snap.get(name) is not None:
                setattr(self, name, model.model_validate(snap[name]))
        if snap.get("metrics") is not None:
            self.metrics = {k: SAEMetrics.model_validate(v) for k, v in snap["metrics"].items()}
        if snap.get("init") is not None:
            i = snap["init"]
            self.init = InitResult(
                RationalFit(**i["fit"]),
                FitParams.model_validate(i["params"]),
                i["c_in"],
                i["thresholds"],
                i["rank_capped"],
            )
        for name in self._SAES:
            if snap.get(name) is not None:
                setattr(self, name, sae_from_snapshot(snap[name]).to(self.device))
        if "extract" in self.done:
            self.train = open_train(self.work_dir / "acts-train", self.host_model, self.device)
            self.evals = ActivationStore(self.work_dir / "acts-eval")


def sae_snapshot(sae: SAE) -> dict[str, Any]:
    """An exact, ``torch.load(weights_only=True)``-safe copy of ``sae``: its cfg, file tensors and state dict."""
    return {
        "cfg": sae.cfg_dict(),
        "tensors": sae.file_tensors(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()},
        "training": sae.training,
    }


def sae_from_snapshot(snap: dict[str, Any]) -> SAE:
    """Rebuild the SAE of :func:`sae_snapshot` bit for bit."""
    cfg = snap["cfg"]
    sae = SAE_REGISTRY[cfg["architecture"]].from_parts(cfg, snap["tensors"])
    sae.load_state_dict(snap["state_dict"])
    return sae.train(bool(snap.get("training", False)))


def load_teacher(cfg: UpgradeConfig) -> tuple[SAE, Family]:
    """The teacher SAE of ``cfg`` and its registered family.

    Raises:
        TeacherError: unreadable teacher, a family that cannot be upgraded (e.g. already rational), a
            family other than the one requested, or a teacher that fails :func:`rsae.checks.check_teacher`
            (invalid thresholds, a non-finite forward, no live latent; typed subclasses naming the cause).
    """
    teacher = load_sae(cfg.teacher)
    if teacher.family not in family_names():
        hint = " (it is already a rational SAE)" if teacher.family == RationalSAE.family else ""
        raise TeacherError(
            f"teacher family {teacher.family!r} cannot be upgraded{hint}; upgradable: {sorted(family_names())}",
            field="teacher",
        )
    if cfg.family is not None and cfg.family != teacher.family:
        raise TeacherError(
            f"family {cfg.family!r} requested but the teacher's cfg says {teacher.family!r}", field="family"
        )
    family = get_family(teacher.family)
    family.check_teacher(teacher)
    check_teacher(teacher)
    return teacher, family


def normalization_notes(teacher: SAE) -> list[str]:
    """The report note of an input normalisation folded into the teacher when it was read
    (``metadata.activation_normalization``, :mod:`rsae.saes.normalization`), else none."""
    rec = teacher.metadata.get("activation_normalization")
    if not isinstance(rec, dict) or not rec.get("folded"):
        return []
    factor = f" (factor {rec['scaling_factor']:.6g})" if isinstance(rec.get("scaling_factor"), (int, float)) else ""
    return [
        f"The teacher's cfg said normalize_activations={rec.get('teacher_normalize_activations')!r}; that input "
        f"normalisation{factor}, from {rec.get('source')}, was folded into its W_enc, b_dec, W_dec as SAELens folds "
        "it, so teacher, RSAE and control read raw activations and every metric is in raw activation units."
    ]


def new_state(cfg: UpgradeConfig, out_dir: Path, work_dir: Path, device: str) -> UpgradeState:
    """The initial state: the request (its hook site resolved, ``eval.batch_size`` chosen for ``device`` when
    None), folders (created), device, and the teacher (on ``device``) with its family.

    Raises:
        TeacherError: see :func:`load_teacher`.
    """
    teacher, family = load_teacher(cfg)
    return state_for(cfg, teacher, family, out_dir, work_dir, device)


def state_for(
    cfg: UpgradeConfig, sae: SAE, family: Family | None, out_dir: Path, work_dir: Path, device: str
) -> UpgradeState:
    """A state for ``sae`` as its teacher without :func:`load_teacher`'s checks: folders created, ``sae`` moved to
    ``device``, the hook site resolved (:func:`resolve_hook_site`) and ``eval.batch_size`` chosen for ``device``
    when None. :func:`new_state` uses it after loading the teacher; ``rsae eval`` (:mod:`rsae.eval_only`) with any
    SAE, a rational one too (``family`` None: stages that need a family must not run).

    Raises:
        ModelError: see :func:`resolve_hook_site`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = UpgradeState(
        cfg=cfg, out_dir=out_dir, work_dir=work_dir, device=device, family=family, teacher=sae.to(device)
    )
    state.cfg, notes = resolve_hook_site(state)
    state.notes.extend(notes + normalization_notes(sae))
    if state.cfg.eval.batch_size is None:  # chosen for the device, recorded in the report's config
        eval_cfg = state.cfg.eval.model_copy(update={"batch_size": eval_batch_size(device)})
        state.cfg = state.cfg.model_copy(update={"eval": eval_cfg})
    return state


def resolve_hook_site(state: UpgradeState) -> tuple[UpgradeConfig, list[str]]:
    """``state.cfg`` with ``layer`` and ``hook`` filled (:func:`rsae.hooknames.choose_site`: the request, the
    teacher's cfg ``hook_name``, or both when they agree), and the notes to report. The model's layout comes
    from its ``config.json`` when its ``model_type`` is known (:data:`rsae.hooknames.LAYOUTS`), else from the
    loaded model's modules. Idempotent: a resolved cfg resolves to itself.

    Raises:
        ModelError: the request contradicts the teacher's site (field ``hook`` or ``layer``; allowed with
            ``data.allow_hook_override``), names no site while the teacher's cfg names none, or names a site the
            model does not have.
    """
    from ..hooknames import choose_site, layout_for_config
    from ..models import model_config

    cfg = state.cfg
    layout = layout_for_config(model_config(cfg.model))
    if layout is None:
        from ..hooks import layout_of

        layout = layout_of(state.host_model()[0])
    teacher_hook = state.teacher.metadata.get("hook_name")
    choice = choose_site(
        cfg.layer,
        cfg.hook,
        teacher_hook if isinstance(teacher_hook, str) else None,
        layout,
        allow_override=cfg.data.allow_hook_override,
    )
    return cfg.model_copy(update={"layer": choice.site.layer, "hook": choice.site.name}), list(choice.notes)
