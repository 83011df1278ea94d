"""What an upgrade costs before it runs: the work of each pipeline stage, its memory, and the rates that turn work
into seconds (``POST /v1/jobs/estimate``; the service aggregates the rates its workers record,
:mod:`service.estimate`).

Each stage's work is counted in one unit proportional to its main cost (multiply-adds, "MACs", for the dense
parts), so a rate measured on one job (work / seconds) predicts another job of other sizes on the same device:

- ``extract``: (train + eval tokens) x blocks run (layer + 1) x 12 d_model^2 (a transformer block's
  multiply-adds per token: 4 d^2 attention + 8 d^2 MLP);
- ``init``: calibration tokens x d_in x d_sae (the teacher's pre-activations; the Remez fit is cached);
- ``calibrate``: calibration steps x (token, latent) entries per step (``calibrate.sample``);
- ``finetune``: steps x batch rows x d_in x d_sae x (2 with the compute-matched control, else 1);
- ``evaluate``: eval tokens x d_in x d_sae x SAEs evaluated (teacher, calibrated and fine-tuned RSAE, control)
  + CE tokens (``ce_sequences`` x ctx_len) x 12 d_model^2 x blocks x (SAEs + 2: clean and zero-ablated runs);
- ``package``: 1 per job.

The units ignore what is small at the default sizes (attention's quadratic term, the probes, the vocabulary
projection in extraction); a rate measured on a job absorbs fixed costs such as loading the model, so rates
from small jobs are pessimistic for large ones. Measured defaults and checks: ``docs/api.md`` ("Estimates").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .config import EVAL_BATCH_SIZES, UpgradeConfig

ESTIMATED_STAGES: tuple[str, ...] = ("extract", "init", "calibrate", "finetune", "evaluate", "package")
"""The stages an estimate times (:data:`rsae.config.STAGES`)."""

WORK_UNITS: dict[str, str] = {
    "extract": "token-block MACs (tokens x blocks run x 12 d_model^2)",
    "init": "MACs (calibration tokens x d_in x d_sae)",
    "calibrate": "gate entries (steps x calibrate.sample)",
    "finetune": "MACs (steps x batch rows x d_in x d_sae x SAEs trained)",
    "evaluate": "MACs (eval tokens x d_in x d_sae x SAEs + CE tokens x 12 d_model^2 x blocks x (SAEs + 2))",
    "package": "jobs",
}
"""What one unit of each stage's work is."""

FLOAT_BYTES = 4
"""Bytes of a float32 (activations, weights and optimiser state are float32 throughout)."""
RUNTIME_BYTES = 1200 * 1024**2
"""Host memory of the worker process beyond the host model's weights and the stages' largest tensors (Python,
torch, transformers, the tokenizer, the data pipeline, the allocator's slack): set so that the estimate of the run
behind :data:`DEFAULT_RATES` equals its measured peak resident set, 2,458 MiB (docs/api.md, "Estimates")."""
DEFAULT_RATES: dict[str, float] = {
    "extract": 3.12e9,
    "init": 2.73e8,
    "calibrate": 3.98e5,
    "finetune": 7.83e8,
    "evaluate": 3.05e9,
    "package": 0.066,
}
"""Work units per second of each stage (:data:`WORK_UNITS`) when a server has recorded none on its device:
measured on :data:`DEFAULT_RATES_DEVICE` (the project's 2-core CPU machine, shared: load average about 14) by one
upgrade of a random-init ReLU teacher (d_sae 2,304, so dense) at layer 3, 16,384 train and 4,096 eval tokens, 100
fine-tuning steps of 1,024 rows; pessimistic for an idle machine (docs/api.md, "Estimates")."""
DEFAULT_RATES_DEVICE = "cpu"
"""The device the default rates were measured on."""
DEFAULT_RATES_MEASURED_AT = datetime(2026, 12, 5, tzinfo=timezone.utc)
"""When the default rates were measured."""
CUDA_CONTEXT_BYTES = 512 * 1024**2
"""Accelerator memory the CUDA context and caching allocator take before any tensor (a round figure)."""


@dataclass(frozen=True)
class JobSizes:
    """The sizes of one upgrade that its cost depends on (None: not known before the worker runs).

    Attributes:
        model: the host model spec. d_model, n_layers: its width and number of blocks. layer: the hook's block.
        d_in, d_sae: the teacher's widths. ctx_len: tokens per sequence.
        train_tokens, eval_tokens: activation rows extracted (requested, or as extracted in a report).
        calibrate_*, finetune_*, ce_sequences, *_batch, shard_tokens: the request's settings of those stages.
        control: whether the compute-matched control is trained too.
    """

    model: str
    d_model: int | None
    n_layers: int | None
    layer: int | None
    d_in: int | None
    d_sae: int | None
    ctx_len: int
    train_tokens: int
    eval_tokens: int
    calibrate_steps: int
    calibrate_sample: int
    calibrate_tokens: int
    finetune_steps: int
    finetune_batch: int
    control: bool
    ce_sequences: int
    extract_batch: int = 8
    eval_batch: int | None = None
    shard_tokens: int = 16_384

    @classmethod
    def from_config(cls, cfg: UpgradeConfig, **known: Any) -> "JobSizes":
        """From a (validated) :class:`~rsae.config.UpgradeConfig` plus the fields it does not hold (``d_model``,
        ``n_layers``, ``layer``, ``d_in``, ``d_sae``, ``ctx_len``; missing ones None, ctx_len 128)."""
        return cls(
            model=cfg.model,
            d_model=known.get("d_model"),
            n_layers=known.get("n_layers"),
            layer=known.get("layer", cfg.layer),
            d_in=known.get("d_in"),
            d_sae=known.get("d_sae"),
            ctx_len=int(known.get("ctx_len") or cfg.data.ctx_len or 128),
            train_tokens=cfg.data.train_tokens,
            eval_tokens=cfg.data.eval_tokens,
            calibrate_steps=cfg.calibrate.steps,
            calibrate_sample=cfg.calibrate.sample,
            calibrate_tokens=cfg.calibrate.tokens,
            finetune_steps=cfg.finetune.steps,
            finetune_batch=cfg.finetune.batch_size,
            control=cfg.finetune.control,
            ce_sequences=cfg.eval.ce_sequences,
            extract_batch=cfg.data.batch_size,
            eval_batch=cfg.eval.batch_size,
            shard_tokens=cfg.data.shard_tokens,
        )

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> "JobSizes":
        """The sizes a finished upgrade ran with, from its ``report.json`` (``config``, ``host_model``,
        ``teacher``, and the rows ``data`` says were extracted).

        Raises:
            KeyError, TypeError, pydantic.ValidationError: not a report of this schema.
        """
        cfg = UpgradeConfig.model_validate(report["config"])
        host, teacher, data = report["host_model"], report["teacher"], report["data"]
        sizes = cls.from_config(
            cfg,
            d_model=host["d_model"],
            n_layers=host["n_layers"],
            layer=host["layer"],
            d_in=teacher["d_in"],
            d_sae=teacher["d_sae"],
            ctx_len=data["train"]["ctx_len"],
        )
        return dataclasses.replace(sizes, train_tokens=data["train"]["rows"], eval_tokens=data["eval"]["rows"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (stored with a throughput record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSizes":
        """From :meth:`to_dict` (unknown keys ignored, so older records stay readable).

        Raises:
            TypeError: a required field is missing.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def saes_evaluated(self) -> int:
        """SAEs the evaluation runs: teacher, calibrated RSAE, fine-tuned RSAE, and the control if trained."""
        return 4 if self.control else 3

    @property
    def ce_tokens(self) -> int:
        """Tokens spliced through the full model for delta CE (``ce_sequences`` x ``ctx_len``)."""
        return self.ce_sequences * self.ctx_len

    @property
    def finetune_rows(self) -> int:
        """Activation rows one fine-tuned SAE sees (steps x batch rows; the control sees as many again)."""
        return self.finetune_steps * self.finetune_batch


def _block_macs(d_model: int) -> int:
    return 12 * d_model * d_model


def stage_work(s: JobSizes) -> dict[str, float | None]:
    """Work of each stage of :data:`ESTIMATED_STAGES` in :data:`WORK_UNITS` (None: a size it needs is unknown)."""
    sae = s.d_in * s.d_sae if s.d_in is not None and s.d_sae is not None else None
    known_model = s.d_model is not None and s.n_layers is not None
    extract = (
        float((s.train_tokens + s.eval_tokens) * (s.layer + 1) * _block_macs(s.d_model))
        if s.d_model is not None and s.layer is not None
        else None
    )
    evaluate = None
    if sae is not None and known_model:
        ce = s.ce_tokens * _block_macs(s.d_model) * s.n_layers * (s.saes_evaluated + 2)
        evaluate = float(s.eval_tokens * sae * s.saes_evaluated + ce)
    return {
        "extract": extract,
        "init": float(s.calibrate_tokens * sae) if sae is not None else None,
        "calibrate": float(max(1, s.calibrate_steps) * s.calibrate_sample),
        "finetune": float(s.finetune_rows * sae * (2 if s.control else 1)) if sae is not None else None,
        "evaluate": evaluate,
        "package": 1.0,
    }


def model_param_count(config: dict[str, Any] | None) -> int | None:
    """Parameters of a decoder-only transformer from its ``config.json`` (embedding, blocks with attention, MLP
    and norms, an untied output head), or None when the widths are not given. A gated MLP (``intermediate_size``
    without ``n_inner``: Llama, Gemma, Qwen, Mistral) has 3 matrices, else 2 (GPT-2, GPT-NeoX)."""
    if not config:
        return None
    d = config.get("hidden_size", config.get("n_embd"))
    n = config.get("num_hidden_layers", config.get("n_layer"))
    vocab = config.get("vocab_size")
    if not (isinstance(d, int) and isinstance(n, int) and isinstance(vocab, int)):
        return None
    gated = "intermediate_size" in config
    d_ff = config.get("intermediate_size") or config.get("n_inner") or 4 * d
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or d // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    attn = d * heads * head_dim * 2 + d * kv * 2  # q, o; k, v
    mlp = (3 if gated else 2) * d * d_ff
    tied = config.get("tie_word_embeddings", True)
    return vocab * d * (1 if tied else 2) + n * (attn + mlp + 2 * d) + d


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of an upgrade, bytes: ``host`` (the worker process's resident set) and ``accelerator``
    (None on a CPU worker); ``by_stage``: each stage's working set beyond the model and the runtime."""

    host: int | None
    accelerator: int | None
    by_stage: dict[str, int | None]


def _stage_bytes(s: JobSizes, vocab: int | None, device: str = "cpu") -> dict[str, int | None]:
    """Working set of each stage beyond the runtime and the host model (bytes; None: a size is unknown). The
    evaluation's sequences per forward: the request's, else the device's default (:data:`EVAL_BATCH_SIZES`)."""
    f = FLOAT_BYTES
    eval_batch = s.eval_batch or EVAL_BATCH_SIZES.get(device.split(":")[0], 8)
    d_model = s.d_model or s.d_in
    shard = 2 * s.shard_tokens * (d_model or 0) * f  # one shard read + its shuffled copy
    if s.d_in is None or s.d_sae is None:
        sae_states = None
    else:
        sae = (2 * s.d_in * s.d_sae + s.d_in + s.d_sae) * f
        sae_states = 6 * sae  # teacher, RSAE, control + the trained one's gradient and two Adam moments
    extract = shard + 8 * s.extract_batch * s.ctx_len * (d_model or 0) * f if d_model else None
    out: dict[str, int | None] = {"extract": extract, "package": sae_states}
    if sae_states is None:
        return {**out, "init": None, "calibrate": None, "finetune": None, "evaluate": None}
    calib = 2 * s.calibrate_tokens * (s.d_in + s.d_sae) * f + 8 * s.calibrate_sample * f
    out["init"] = sae_states + calib
    out["calibrate"] = sae_states + calib
    out["finetune"] = sae_states + shard + 6 * s.finetune_batch * (s.d_sae + s.d_in) * f
    logits = 3 * eval_batch * s.ctx_len * vocab * f if vocab and s.ce_sequences else 0
    out["evaluate"] = sae_states + shard + logits + 4 * eval_batch * s.ctx_len * s.d_sae * f
    return out


def memory_estimate(s: JobSizes, model_params: int | None, vocab: int | None, device: str) -> MemoryEstimate:
    """Peak host and accelerator memory of the upgrade ``s`` on ``device`` (``cpu``, ``cuda...``).

    The host model (``model_params`` float32 weights) stays loaded for the whole job; on CPU everything is
    host memory; on CUDA the model and the stages' tensors are on the accelerator (plus
    :data:`CUDA_CONTEXT_BYTES`), and the host holds the runtime, the model while it loads, and the shards read
    from disk. Figures are upper-bound style sums of the largest tensors, not measurements (docs/api.md).
    """
    stages = _stage_bytes(s, vocab, device)
    model = model_params * FLOAT_BYTES if model_params is not None else None
    known = [v for v in stages.values() if v is not None]
    complete = model is not None and len(known) == len(stages)
    peak_stage = max(known) if complete else None
    if not device.startswith("cuda"):
        host = RUNTIME_BYTES + model + peak_stage if complete else None
        return MemoryEstimate(host=host, accelerator=None, by_stage=stages)
    shard = 2 * s.shard_tokens * (s.d_model or s.d_in or 0) * FLOAT_BYTES
    host = RUNTIME_BYTES + model + shard if model is not None else None
    accel = CUDA_CONTEXT_BYTES + model + peak_stage if complete else None
    return MemoryEstimate(host=host, accelerator=accel, by_stage=stages)
