"""The model card ``README.md`` of an upgraded SAE's artifact folder, so that the folder can be pushed to the
Hugging Face hub as it is (``HfApi().upload_folder(folder_path=..., repo_id=...)``).

The card follows the hub's model-card format (YAML front matter + Markdown; https://huggingface.co/docs/hub/
model-cards), written with ``huggingface_hub``'s own :class:`~huggingface_hub.ModelCardData`: ``library_name:
saelens`` (the hub then shows SAELens's loading snippet, as for SAELens's own uploads), ``base_model`` the host
model when it is a hub id, ``datasets`` when the data set is one, ``tags``, and ``sae_*`` keys naming the
teacher, hook and data. The body states the teacher, host model and hook, the data and its conventions, the
held-out metrics of teacher / RSAE at init / RSAE / control, how to load it, and the files.
"""

from __future__ import annotations

from typing import Any

from .hub import REPO_ID

ROWS = (
    ("teacher", "teacher"),
    ("rsae_init", "RSAE at init (calibrated)"),
    ("rsae", "**RSAE (this SAE)**"),
    ("control", "control (teacher fine-tuned with its own gate)"),
)
"""Report metric keys and their labels in the metrics table, in order."""


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of the held-out metrics (units in the header)."""
    lines = [
        "| SAE | MSE | FVU | L0 | alive | ΔCE (nats/token) ± s.e. | loss recovered | KL (nats/token) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in ROWS:
        m = metrics.get(key)
        if not m:
            continue
        dce = _fmt(m.get("delta_ce"), ".4f")
        if m.get("delta_ce_se") is not None:
            dce += f" ± {m['delta_ce_se']:.4f}"
        lines.append(
            f"| {label} | {_fmt(m.get('mse'), '.4g')} | {_fmt(m.get('fvu'), '.4f')} | {_fmt(m.get('l0'), '.1f')} | "
            f"{_fmt(m.get('alive_fraction'), '.3f')} | {dce} | {_fmt(m.get('loss_recovered'), '.4f')} | "
            f"{_fmt(m.get('kl'), '.4f')} |"
        )
    return lines


_USE_SECTION: tuple[str, ...] = (
    "## Use",
    "",
    "```python",
    "import rsae.saelens_arch  # registers the 'rational' architecture with SAELens (pip install rsae-service)",
    "from sae_lens import SAE",
    "",
    'sae = SAE.load_from_disk("path/to/this/folder")',
    "# or, from a hub repository holding this folder at its root:",
    'sae = SAE.from_pretrained("<org>/<repo>", ".")',
    "z = sae.encode(x)  # x [..., d_in] -> latents [..., d_sae], exact zeros",
    "```",
    "",
    "Without SAELens: `from rsae.saes import RationalSAE; sae = RationalSAE.load(folder)`.",
    "",
)
"""The model card's "Use" section: how to load the folder in SAELens and in rsae."""


def model_card(report: dict[str, Any], cfg: dict[str, Any], files: list[str]) -> str:
    """The text of ``README.md`` for an artifact folder.

    Args:
        report: the ``report.json`` content (:class:`rsae.report.Report` dumped by alias).
        cfg: the ``cfg.json`` content of the upgraded SAE (its ``metadata`` names model, hook, data).
        files: the names of the folder's other files, listed in the card.

    Returns:
        Markdown with YAML front matter; :class:`huggingface_hub.ModelCard` parses it (``library_name:
        saelens``).
    """
    from huggingface_hub import ModelCardData

    meta = cfg.get("metadata") or {}
    teacher = report["teacher"]
    model, hook = meta.get("model_name"), meta.get("hook_name")
    dataset = meta.get("dataset_path")
    card = ModelCardData(
        library_name="saelens",
        base_model=model if isinstance(model, str) and REPO_ID.match(model) else None,
        datasets=[dataset] if isinstance(dataset, str) and REPO_ID.match(dataset) else None,
        tags=["sparse-autoencoder", "sae", "saelens", "rsae", "rational-sae", "interpretability"],
        sae_architecture=cfg.get("architecture"),
        sae_teacher=teacher["source"],
        sae_teacher_sha256=teacher["sha256"],
        sae_hook_name=hook,
        sae_dataset=dataset,
    )
    source = meta.get("model_source")
    model_line = f"`{model}`" + (f" (weights used: {source['note']}; `{source['package']}`)" if source else "")
    data = report["data"]
    keys = ("context_size", "prepend_bos", "seqpos_slice", "exclude_special_tokens")
    conv = ", ".join(f"{k} `{meta[k]}`" for k in keys if k in meta)
    n_eval = next((m.get("n_tokens") for m in report["metrics"].values() if m.get("n_tokens")), None)
    ce_tokens = next((m.get("ce_tokens") for m in report["metrics"].values() if m.get("ce_tokens")), None)
    body = [
        f"# Rational SAE: upgrade of `{teacher['source']}`",
        "",
        "A sparse autoencoder whose gate is a trainable rational function (Rational SAE, Yin & Yu 2026, "
        "arXiv 2606.14990), initialised from the teacher below and fine-tuned on the data below by the RSAE "
        "upgrade service. SAELens layout (`cfg.json` + `sae_weights.safetensors`, architecture `rational`).",
        "",
        "| | |",
        "|---|---|",
        f"| host model | {model_line} |",
        f"| hook | `{hook}` (block {meta.get('hook_layer')}) |",
        f"| width | d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')} |",
        f"| teacher | `{teacher['source']}`: {teacher['architecture']} ({teacher['family']}), "
        f"weights sha256 `{teacher['sha256'][:16]}…` |",
        f"| data | `{dataset}`: {data['train']['rows']:,} training and {data['eval']['rows']:,} held-out "
        f"activation rows; {conv} |",
        "",
        "## Held-out evaluation",
        "",
        f"On {n_eval or 'n/a'} held-out tokens (reconstruction) and {ce_tokens or 'n/a'} tokens (downstream "
        "loss, the host model with the SAE's reconstruction spliced in at the hook). FVU about the mean; "
        "ΔCE = CE spliced − CE clean; loss recovered = (CE zero − CE spliced) / (CE zero − CE clean).",
        "",
        *_metrics_table(report["metrics"]),
        "",
        "The same numbers in SAEBench's `core` schema: `core_eval_results.json`; all of them, with the fit, the "
        "calibration and the training curves: `report.json` / `report.html`.",
        "",
        *_USE_SECTION,
        "## Files",
        "",
        *[f"- `{f}`" for f in sorted(files)],
    ]
    notes = report.get("notes") or []
    if notes:
        body += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
