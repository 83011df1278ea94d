"""``rsae`` command line: train a teacher, run an upgrade locally, inspect an SAE folder, and drive jobs on a
running service (``rsae jobs ...``: a plugin the service package registers under the ``rsae.cli`` entry-point
group, so the core never imports the service)."""

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


def print_metrics_table(report: dict, file=sys.stdout) -> None:
    """Print teacher vs upgraded metrics from a report dict as an aligned text table."""
    cols = [c for c in ("teacher", "rsae_init", "rsae", "control") if c in report["metrics"]]
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


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Run the whole RSAE pipeline locally and write the artifact folder."""
    from .pipeline import run_upgrade

    settings = json.loads(args.settings) if args.settings else {}
    cfg = UpgradeConfig(model=args.model, layer=args.layer, hook=args.hook, teacher=args.teacher, **settings)
    bar = _bar()

    def prog(stage: str, progress: float, metrics=None) -> None:
        bar.set_description(f"{stage:<9}")
        bar.n = 100 * progress
        bar.refresh()

    report = run_upgrade(cfg, args.out, work_dir=args.work_dir, on_progress=prog)
    bar.close()
    print_metrics_table(report)
    print(f"\nupgraded SAE: {Path(args.out).resolve()}")
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
    u.set_defaults(func=cmd_upgrade)

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
