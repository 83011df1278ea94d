"""``rsae`` command line: train a teacher, run an upgrade locally, evaluate an SAE alone, convert a foreign teacher
to the SAELens layout, inspect an SAE folder, and drive jobs on a running service (``rsae jobs ...``: a plugin the
service package registers under the ``rsae.cli`` entry-point group, so the core never imports the service)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .config import UpgradeConfig
from .errors import RSAEError


def _bar():
    from tqdm import tqdm

    return tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}% [{elapsed}<{remaining}]")


def cmd_train_teacher(args: argparse.Namespace) -> int:
    """Train a teacher SAE (ReLU, JumpReLU or TopK) on real activations and save it in the SAELens layout."""
    from .teacher import train_teacher_from_text

    bar = _bar()

    def prog(f: float) -> None:
        bar.n = 100 * f
        bar.refresh()

    out = train_teacher_from_text(
        args.model,
        args.layer,
        args.out,
        hook=args.hook,
        family=args.family,
        dataset=args.dataset,
        d_sae=args.d_sae,
        train_tokens=args.tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        l1_coefficient=args.l1,
        k=args.k,
        seed=args.seed,
        device=args.device,
        on_progress=prog,
    )
    bar.close()
    print(f"teacher saved to {out}")
    return 0


def print_metrics_table(report: dict, file=None) -> None:
    """Print the metrics of a report dict (``{"metrics": {column: SAEMetrics fields}}``) as an aligned text table:
    the columns teacher, rsae_init, rsae, control that it has, else all of its columns in order (``rsae eval``:
    one column ``sae``). ``file``: where to print (None: the current ``sys.stdout``)."""
    file = file or sys.stdout
    cols = [c for c in ("teacher", "rsae_init", "rsae", "control") if c in report["metrics"]] or list(report["metrics"])
    rows = [
        ("MSE", "mse", "{:.2f}"),
        ("FVU", "fvu", "{:.4f}"),
        ("L0", "l0", "{:.1f}"),
        ("alive fraction", "alive_fraction", "{:.3f}"),
        ("CE clean", "ce_clean", "{:.4f}"),
        ("CE spliced", "ce_spliced", "{:.4f}"),
        ("CE zero-abl.", "ce_zero", "{:.4f}"),
        ("delta CE", "delta_ce", "{:.4f}"),
        ("loss recovered", "loss_recovered", "{:.2%}"),
        ("KL", "kl", "{:.4f}"),
    ]
    ks = sorted({k for c in cols for k in (report["metrics"][c].get("probe_accuracy") or {})}, key=int)
    rows += [(f"probe acc k={k}", ("probe_accuracy", k), "{:.3f}") for k in ks]
    print(f"{'metric':<16}" + "".join(f"{c:>14}" for c in cols), file=file)
    for label, key, fmt in rows:
        vals = [
            (report["metrics"][c].get(key[0]) or {}).get(key[1])
            if isinstance(key, tuple)
            else report["metrics"][c].get(key)
            for c in cols
        ]
        cells = "".join(f"{(fmt.format(v) if v is not None else '-'):>14}" for v in vals)
        print(f"{label:<16}{cells}", file=file)


def _progress_bar(enabled: bool = True):
    """A progress callback ``(stage, overall, metrics)`` drawing a tqdm bar on stderr, and the bar (None when
    not ``enabled``)."""
    if not enabled:
        return None, None
    bar = _bar()

    def prog(stage: str, progress: float, metrics=None) -> None:
        bar.set_description(f"{stage:<9}")
        bar.n = 100 * progress
        bar.refresh()

    return prog, bar


def upgrade_summary(report: dict, out: str | Path) -> dict:
    """The final summary of ``rsae upgrade --json``: ``{"out", "metrics" (per column, as report.json),
    "comparisons", "artifacts" (file name -> absolute path of every file in ``out``), "notes"}``."""
    out = Path(out).resolve()
    files = sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    return {
        "out": str(out),
        "metrics": report["metrics"],
        "comparisons": report.get("comparisons"),
        "artifacts": {p.name: str(p) for p in files},
        "notes": report.get("notes", []),
    }


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Run the whole RSAE pipeline locally and write the artifact folder."""
    from .pipeline import run_upgrade

    settings = json.loads(args.settings) if args.settings else {}
    cfg = UpgradeConfig(model=args.model, layer=args.layer, hook=args.hook, teacher=args.teacher, **settings)
    prog, bar = _progress_bar()
    report = run_upgrade(cfg, args.out, work_dir=args.work_dir, on_progress=prog)
    bar.close()
    if args.json:
        print(json.dumps(upgrade_summary(report, args.out), indent=2))
        return 0
    print_metrics_table(report)
    print(f"\nupgraded SAE: {Path(args.out).resolve()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one SAE alone (any format; an RSAE too) on held-out text: MSE, FVU, L0, delta CE, loss recovered,
    KL (sequence-clustered s.e.), optionally probes; SAEBench's core JSON with --out."""
    from .eval_only import eval_config, evaluate_sae

    settings = json.loads(args.settings) if args.settings else {}
    if not isinstance(settings, dict):
        raise ValueError("--settings must be a JSON object")
    cfg = eval_config(
        args.sae, model=args.model, layer=args.layer, hook=args.hook, dataset=args.dataset, settings=settings
    )
    prog, bar = _progress_bar(not args.no_progress)
    fmt = None if args.format == "auto" else args.format.replace("-", "_")
    result = evaluate_sae(
        args.sae, cfg, out_dir=args.out, work_dir=args.work_dir, format=fmt, hookpoint=args.hookpoint, on_progress=prog
    )
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    host, data = result["host"], result["data"]["eval"]
    print(f"{result['sae']['class']} d_in={result['sae']['d_in']} d_sae={result['sae']['d_sae']}")
    print(f"{host['name']} at {host['hook']}; {data['dataset']} held-out, {data['rows']} tokens\n")
    print_metrics_table({"metrics": {"sae": result["metrics"]}})
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Convert a teacher in a foreign format (Gemma Scope, sparsify, dictionary_learning, SAELens) to the SAELens
    layout (cfg.json + sae_weights.safetensors; loads with sae_lens.SAE.load_from_disk)."""
    from .formats import import_teacher

    fmt = None if args.format == "auto" else args.format.replace("-", "_")
    det = import_teacher(args.src, args.out, format=fmt, hookpoint=args.hookpoint)
    out = Path(args.out).resolve()
    if args.json:
        print(json.dumps({"out": str(out), "source": det.to_dict()}, indent=2))
        return 0
    print(f"{det.format} {det.source_architecture} -> SAELens {det.family} (d_in={det.d_in}, d_sae={det.d_sae})")
    for c in det.conventions:
        print(f"  - {c}")
    print(f"saved to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print the architecture, shapes and gate of an SAE folder."""
    from .saes import RationalSAE, load_sae

    sae = load_sae(args.path)
    info = {"class": type(sae).__name__, **{k: v for k, v in sae.cfg_dict().items() if k != "metadata"}}
    if isinstance(sae, RationalSAE):
        info["gate"] = sae.gate_summary()
    print(json.dumps(info, indent=2))
    return 0


_HOOK_HELP = (
    "hook site: blocks.L.hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn.hook_z, a bare site with "
    "--layer, or a module path such as model.layers.5.mlp"
)


FORMAT_CHOICES = ["auto", "saelens", "gemma-scope", "sparsify", "dictionary-learning"]
"""``--format`` values of ``rsae eval`` / ``rsae import`` (``rsae.formats.FORMATS`` with dashes, plus auto)."""


def _eval_parser(sub) -> None:
    """Add ``rsae eval`` to the subcommands ``sub``."""
    e = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    e.add_argument("--sae", required=True, help="SAE folder: SAELens, Gemma Scope, sparsify, dictionary_learning, RSAE")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--layer", type=int, default=None, help="block index L (default: the SAE's cfg hook_name)")
    e.add_argument("--hook", default=None, help=_HOOK_HELP)
    e.add_argument("--dataset", default=None, help="data source (settings.data.dataset; default bbc-news)")
    e.add_argument(
        "--settings",
        default=None,
        help='JSON object of UpgradeConfig fields (data, eval, model_dtype, seed, device), e.g. \'{"data": '
        '{"eval_tokens": 4096}, "eval": {"ce_sequences": 32, "probe_ks": [1, 5]}}\'; probes are off unless '
        "eval.probe_ks is given",
    )
    e.add_argument("--out", default=None, help="folder for eval.json and SAEBench's core_eval_results.json")
    e.add_argument("--work-dir", default=None, help="activation folder, reused when it matches (default: temporary)")
    e.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="SAE folder format (auto: detected)")
    e.add_argument("--hookpoint", default=None, help="sub-folder of a sparsify run folder")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``rsae`` command."""
    from . import __version__

    p = argparse.ArgumentParser(prog="rsae", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"rsae {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train-teacher", help=cmd_train_teacher.__doc__)
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--layer", type=int, default=None, help="block index L (alone: hook blocks.L.hook_resid_post)")
    t.add_argument("--hook", default=None, help=_HOOK_HELP)
    t.add_argument("--out", required=True, help="output folder (SAELens layout)")
    t.add_argument(
        "--family",
        default="relu",
        choices=["relu", "jumprelu", "topk"],
        help="gate family: relu (L1 penalty), jumprelu (L0 penalty, straight-through thresholds), "
        "topk (k largest, AuxK)",
    )
    t.add_argument("--dataset", default="bbc-news")
    t.add_argument("--d-sae", type=int, default=2304)
    t.add_argument("--tokens", type=int, default=32768, help="training activation rows")
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument(
        "--l1",
        type=float,
        default=None,
        help="sparsity coefficient: L1 lambda (relu), L0 lambda (jumprelu); default per family",
    )
    t.add_argument("--k", type=int, default=32, help="active latents per token (topk)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train_teacher)

    u = sub.add_parser("upgrade", help=cmd_upgrade.__doc__)
    u.add_argument("--model", default="smollm2-135m")
    u.add_argument("--layer", type=int, default=None, help="block index L (default: the teacher's cfg hook_name)")
    u.add_argument("--hook", default=None, help=_HOOK_HELP)
    u.add_argument("--teacher", required=True, help="teacher folder (SAELens layout)")
    u.add_argument("--out", required=True)
    u.add_argument("--work-dir", default=None)
    u.add_argument(
        "--settings", default=None, help='JSON object of UpgradeConfig fields, e.g. \'{"finetune": {"steps": 200}}\''
    )
    u.add_argument("--json", action="store_true", help="print the final summary (metrics, artifact paths) as JSON")
    u.set_defaults(func=cmd_upgrade)

    _eval_parser(sub)
    m = sub.add_parser("import", help=cmd_import.__doc__, description=cmd_import.__doc__)
    m.add_argument("--src", required=True, help="folder of the foreign teacher")
    m.add_argument("--out", required=True, help="output folder (SAELens layout)")
    m.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="source format (auto: detected)")
    m.add_argument("--hookpoint", default=None, help="sub-folder of a sparsify run folder (one coder per hookpoint)")
    m.add_argument("--json", action="store_true", help="print the output folder and the detection report as JSON")
    m.set_defaults(func=cmd_import)

    i = sub.add_parser("info", help=cmd_info.__doc__)
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    for ep in entry_points(group="rsae.cli"):  # plugins, e.g. `rsae jobs ...` from the service package
        ep.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rsae`` console script. Returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except RSAEError as e:
        print(f"error{f' in {e.field}' if e.field else ''}: {e.message}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic validation errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
