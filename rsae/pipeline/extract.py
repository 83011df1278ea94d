"""Stage 1, extract: run the host model on the text and store the hook's activations (train and held-out).

An activation folder whose manifest matches the request is reused, so a restarted job does not extract
twice (:func:`rsae.activations.extract_activations` writes the shards and the manifest). With streamed training
activations (``settings.data.activation_storage``, :mod:`rsae.stream`) only the first ``stream_disk_tokens``
training rows go to disk, and ``state.train`` streams the rest during fine-tuning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..activations import MANIFEST, ActivationStore, extract_activations
from ..config import UpgradeConfig
from ..data import ContextConventions, SourceOptions, resolve_conventions
from ..errors import TeacherError
from ..hooks import site_for, site_width
from ..models import resolve_dtype
from ..report import HostModel
from ..stream import open_train, storage_mode, stream_manifest, train_disk_rows
from .progress import RunContext
from .state import UpgradeState

log = logging.getLogger(__name__)


def conventions(state: UpgradeState) -> ContextConventions:
    """The upgrade's context conventions: the request's ``settings.data``, else the teacher's ``cfg.json``
    metadata, else the defaults (:func:`rsae.data.resolve_conventions`).

    Raises:
        DataError: a malformed value, naming ``data.<key>``.
    """
    return resolve_conventions(state.cfg.data.requested_conventions(), state.teacher.metadata)


def activations(
    state: UpgradeState,
    ctx: RunContext,
    split: str,
    n: int,
    folder: Path,
    lo: float,
    hi: float,
    conv: ContextConventions | None = None,
    storage: dict | None = None,
) -> ActivationStore:
    """The ``split`` activations (``n`` rows) in ``folder``: reused when its manifest matches the request
    (conventions, data source, host-model dtype and ``storage`` included), else extracted; progress runs from
    ``lo`` to ``hi`` of the stage. ``storage``: the manifest's stream entry (:func:`rsae.stream.stream_manifest`)
    when these rows are the on-disk head of a streamed split; None for a split wholly on disk."""
    cfg = state.cfg
    conv = conv or conventions(state)
    dtype = resolve_dtype(cfg.model_dtype, state.device)
    want = {
        "layer": cfg.layer,
        "hook": cfg.hook,
        "rows": n,
        "ctx_len": conv.context_size,
        "conventions": conv.to_dict(),
        "source": cfg.data.source_options(),
        "dataset": cfg.data.dataset,
        "split": split,
        "eval_fraction": cfg.data.eval_fraction,
        "seed": split_seed(cfg),
        "model": cfg.model,
        "model_dtype": dtype,
        "storage": storage,
    }
    mf = folder / MANIFEST
    if mf.is_file():
        have = json.loads(mf.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            log.info("reusing %s activations in %s", split, folder)
            ctx.progress.report(hi)
            return ActivationStore(folder)
    model, tok = state.host_model()
    extract_activations(
        model,
        tok,
        layer=cfg.layer,
        hook=cfg.hook,
        dataset=cfg.data.dataset,
        split=split,
        n_tokens=n,
        out_dir=folder,
        conventions=conv,
        options=SourceOptions(**cfg.data.source_options()),
        eval_fraction=cfg.data.eval_fraction,
        seed=split_seed(cfg),
        batch_size=cfg.data.batch_size,
        shard_tokens=cfg.data.shard_tokens,
        device=state.device,
        meta={"model": cfg.model, "model_dtype": dtype, "source": cfg.data.source_options()}
        | ({} if storage is None else {"storage": storage}),
        on_progress=ctx.progress.within(lo, hi),
    )
    return ActivationStore(folder)


def split_seed(cfg: UpgradeConfig) -> int:
    """The seed of the train / held-out document split: ``data.split_seed``, else the job's ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


def host_section(state: UpgradeState) -> HostModel:
    """The report's host model section (:class:`rsae.report.HostModel`) after checking that the teacher reads
    activations as wide as the host model's at the state's (resolved) hook site.

    Raises:
        ModelError: unknown model, or a hook site it does not have (layer out of range, a missing module).
        TeacherError: teacher d_in != the width of the activations at the hook site (field ``teacher``).
    """
    cfg, teacher = state.cfg, state.teacher
    model, _ = state.host_model()
    site = site_for(model, cfg.layer, cfg.hook)
    width = site_width(model, site)
    if teacher.d_in != width:
        raise TeacherError(
            f"teacher d_in={teacher.d_in} but the activations of model {cfg.model!r} at {site.name} are {width} wide",
            field="teacher",
        )
    return HostModel(
        name=cfg.model,
        layer=site.layer,
        hook=site.name,
        d_model=model.config.hidden_size,
        n_layers=model.config.num_hidden_layers,
        device=state.device,
        dtype=resolve_dtype(cfg.model_dtype, state.device),
    )


def extract(state: UpgradeState, ctx: RunContext) -> None:
    """Check the host model against the teacher, then fill ``state.host``, ``state.train``, ``state.evals``,
    and check the teacher on the first real activations (:meth:`UpgradeState.calibration_data`, kept for init).
    ``state.train`` is a :class:`rsae.stream.StreamedActivations` when the training activations are streamed
    (:func:`rsae.stream.storage_mode`), else an :class:`rsae.activations.ActivationStore`.

    Raises:
        ModelError: unknown model, or a hook site it does not have (layer out of range, a missing module).
        TeacherError: teacher d_in != the width of the activations at the hook site.
        DataError: unreadable or too small data set. DeadTeacherError, NonFiniteTeacherError: no latent
        fires on the calibration tokens, or the teacher is not finite on them (:func:`rsae.checks.check_activations`).
    """
    cfg = state.cfg
    state.host = host_section(state)
    width = state.teacher.d_in
    conv = conventions(state)
    work, data = state.work_dir, cfg.data
    storage = None
    if storage_mode(data.activation_storage, data.train_tokens, width) == "stream":
        storage = stream_manifest(
            data.train_tokens, data.stream_buffer_tokens, data.batch_size, data.activation_storage
        )
    n_disk = train_disk_rows(data, cfg.calibrate.tokens, width)
    head = activations(state, ctx, "train", n_disk, work / "acts-train", 0.0, 0.8, conv, storage)
    state.train = open_train(head.folder, state.host_model, state.device)
    state.evals = activations(state, ctx, "eval", cfg.data.eval_tokens, work / "acts-eval", 0.8, 1.0, conv)
    state.calibration_data()  # the data-dependent teacher checks, here rather than at the end of the job
