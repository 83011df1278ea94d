"""``rsae jobs ...``: submit, follow, download and cancel upgrade jobs on a running service.

Examples (``RSAE_URL`` and ``RSAE_TOKEN`` from the environment, or ``--url`` / ``--token``)::

    rsae jobs submit --teacher teacher/ --layer 3 --wait          # upload (any of the 4 formats), submit, follow
    rsae jobs submit --sae-id 6f1c... --layer 3 --estimate-only   # time, disk, memory, limits; submits nothing
    rsae jobs submit --sae-id 6f1c... --layer 3 --settings '{"finetune": {"steps": 200}}' --metadata run=a
    rsae jobs submit --hub-release <SAELens release> --hub-sae-id <id> --layer 3
    rsae jobs submit --hub-repo org/name --hub-subfolder layer_3 --layer 3
    rsae jobs status <job id> [--json]                            # a summary, or the job object as JSON
    rsae jobs wait <job id>                                       # progress bar until terminal; exit 0 if succeeded
    rsae jobs download <job id> --out upgraded/                   # sha256-checked artifacts
    rsae jobs cancel <job id>
    rsae jobs list [--status running] [--metadata run=a] [--json]

The teacher folder may hold any supported format (detected from its files: SAELens cfg.json +
sae_weights.safetensors, sparsify cfg.json + sae.safetensors, Gemma Scope params.npz, dictionary_learning
ae.pt + config.json). ``submit`` first shows the server's estimate of the job (``POST /v1/jobs/estimate``: expected
time per stage, tokens, disk, memory) on stderr, refuses a job the server's limits would refuse, and asks before
submitting one expected to take longer than ``--confirm-over`` seconds when stdin is a terminal (default 1800;
``--yes`` does not ask; anything but ``y``/``yes`` submits nothing; a script, whose stdin is not a terminal, is not
asked and submits as before). It prints the job as JSON (with ``--wait``: a summary, or with
``--json`` the final job as JSON).

Exit codes: 0 success (for ``wait``: the job succeeded), 1 the job failed or was cancelled, 2 bad input or
an API error (the problem's code, detail and field are printed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

from rsae_client import ApiError, HubRef, Job, JobEstimate, RSAEClient
from rsae_client.models import JOB_STATUSES

DEFAULT_CONFIRM_SECONDS = 1800.0
"""``rsae jobs submit`` asks before submitting a job whose estimate is longer than this (``--confirm-over``)."""


def _client(args: argparse.Namespace) -> RSAEClient:
    return RSAEClient(args.url, args.token)


def _print(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    elif isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    print(json.dumps(obj, indent=2))


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``.

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--metadata {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _hub(args: argparse.Namespace) -> HubRef | None:
    """The hub reference of ``--hub-*`` flags, or None when none is given."""
    fields = {
        "repo_id": args.hub_repo,
        "subfolder": args.hub_subfolder,
        "revision": args.hub_revision,
        "release": args.hub_release,
        "sae_id": args.hub_sae_id,
    }
    if all(v is None for v in fields.values()):
        return None
    return HubRef(**fields)


class _ProgressBar:
    """A tqdm bar driven by job events: ``progress`` events move it, ``status``/``metrics`` annotate it."""

    def __init__(self, job_id: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=100,
            desc=f"job {job_id[:8]}",
            unit="%",
            file=sys.stderr,
            bar_format="{desc} {l_bar}{bar}| {n:.0f}/{total:.0f}% [{elapsed}<{remaining}]",
        )

    def __call__(self, event: dict[str, Any]) -> None:
        """Apply one event."""
        data = event["data"]
        if event["type"] == "progress":
            self.bar.n = 100 * float(data.get("progress", 0.0))
            self.bar.set_postfix_str(str(data.get("stage", "")), refresh=False)
            self.bar.refresh()
        elif event["type"] == "status":
            self.bar.set_postfix_str(data["status"])
        elif event["type"] == "metrics" and "mse" in data:
            self.bar.set_postfix_str(f"{data.get('stage', '')} step {data.get('step', '?')} mse {data['mse']:.4g}")

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def _wait(c: RSAEClient, job_id: str, quiet: bool, timeout: float | None, as_json: bool = False) -> int:
    bar = None if quiet else _ProgressBar(job_id)
    try:
        job = c.wait(job_id, timeout=timeout, on_event=bar)
    finally:
        if bar is not None:
            bar.close()
    _summary(job)
    if as_json:
        _print(job)
    return 0 if job.status == "succeeded" else 1


def _summary(job: Job, file: Any = None) -> None:
    file = file or sys.stderr
    print(f"job {job.id} {job.status}", file=file)
    if job.error:
        err = job.error
        print(f"  {err.code}: {err.detail}" + (f" [field {err.field}]" if err.field else ""), file=file)
    m = job.metrics or {}
    if m:
        print("  " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float))), file=file)


def _seconds(x: float | None) -> str:
    if x is None:
        return "unknown"
    m, sec = divmod(round(x), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else (f"{m} min {sec} s" if m else f"{x:.1f} s")


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def print_estimate(est: JobEstimate, file: Any = None) -> None:
    """A human summary of an estimate: total, tokens, disk, memory, each stage with its basis, limits, warnings."""
    file = file or sys.stderr
    verdict = "allowed to proceed" if est.allowed_to_proceed else "NOT allowed: see the limits below"
    print(f"estimate on {est.device}: {_seconds(est.total_seconds)} in all ({verdict})", file=file)
    t = est.tokens
    print(
        f"  tokens: train {t.train:,}, eval {t.eval:,}, fine-tuning rows {t.finetune_rows:,} per SAE, CE {t.ce:,}",
        file=file,
    )
    print(
        f"  disk: activations {_bytes(est.disk.activations_bytes)}, artifacts {_bytes(est.disk.artifacts_bytes)}; "
        f"peak memory: host {_bytes(est.memory.host_bytes)}, accelerator "
        f"{_bytes(est.memory.accelerator_bytes) if est.memory.accelerator_bytes is not None else '-'}",
        file=file,
    )
    for st in est.stages:
        print(f"  {st.stage:<10} {_seconds(st.seconds):>14}  {st.basis.detail}", file=file)
    for p in est.limits_exceeded:
        print(f"  limit: {p.status} {p.code}" + (f" [field {p.field}]" if p.field else "") + f": {p.detail}", file=file)
    for p in est.warnings:
        print(f"  warning: {p.code}: {p.detail}", file=file)


def _confirm(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    try:
        return input().strip().lower() in ("y", "yes")
    except (EOFError, OSError):  # stdin closed or unreadable: no answer is no
        return False


def _estimate_gate(c: RSAEClient, body: dict[str, Any], args: argparse.Namespace) -> int | None:
    """Ask the server for the job's estimate (``POST /v1/jobs/estimate``) and show it; the exit code if the job
    must not be submitted (``--estimate-only``: 0 when allowed, else 1; limits exceeded: 2; the question over
    ``--confirm-over`` seconds, asked when stdin is a terminal, answered anything but yes: 1), or None to submit."""
    est = c.estimate(body)
    if args.estimate_only:
        if args.json:
            _print(est)
        else:
            print_estimate(est, file=sys.stdout)
        return 0 if est.allowed_to_proceed else 1
    print_estimate(est)
    if not est.allowed_to_proceed:
        print("error: the server would refuse this job (limits above); not submitted", file=sys.stderr)
        return 2
    total = est.total_seconds
    if not args.yes and total is not None and total > args.confirm_over:
        if not sys.stdin.isatty():  # a script: nobody to ask; submit as before this question existed
            print(f"expected {_seconds(total)}: submitting without asking (stdin is not a terminal)", file=sys.stderr)
            return None
        question = f"expected {_seconds(total)}, over {_seconds(args.confirm_over)}: submit? [y/N] "
        if not _confirm(question):
            print("not submitted (--yes submits without asking)", file=sys.stderr)
            return 1
    return None


def cmd_submit(args: argparse.Namespace) -> int:
    """Upload the teacher (any supported format; unless --sae-id or --hub-*), show the job's estimate, ask before
    submitting one expected to take longer than --confirm-over seconds (unless --yes), and create the job; prints
    the job as JSON (or follows it with --wait). --estimate-only prints the estimate and submits nothing."""
    if args.webhook_url and not args.webhook_secret:
        print("error: --webhook-url needs --webhook-secret (or $RSAE_WEBHOOK_SECRET)", file=sys.stderr)
        return 2
    try:
        settings = json.loads(args.settings) if args.settings else {}
        metadata = _metadata(args.metadata)
        hub = _hub(args)
    except (json.JSONDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sources = [x for x in (args.teacher, args.sae_id, hub) if x is not None]
    if len(sources) != 1:
        print("error: give exactly one teacher: --teacher FOLDER, --sae-id ID or --hub-*", file=sys.stderr)
        return 2
    with _client(args) as c:
        if hub is not None:
            teacher: dict[str, Any] = {"hub": hub}
        else:
            try:
                sae_id = args.sae_id or c.upload_sae(args.teacher, name=args.name, format=args.format).id
            except (ValueError, FileNotFoundError) as e:
                print(f"error: --teacher: {e}", file=sys.stderr)
                return 2
            teacher = {"sae_id": sae_id}
        body: dict[str, Any] = {"model": args.model, "teacher": teacher, "settings": settings}
        body |= {k: v for k, v in (("layer", args.layer), ("hook", args.hook)) if v is not None}
        if metadata:
            body["metadata"] = metadata
        if args.webhook_url:
            body["webhook"] = {"url": args.webhook_url, "secret": args.webhook_secret}
        go = _estimate_gate(c, body, args)
        if go is not None:
            if args.teacher is not None and not args.sae_id:  # uploaded only for this job: not left behind
                c.delete_sae(teacher["sae_id"])
                print(f"deleted the teacher uploaded for it ({teacher['sae_id']})", file=sys.stderr)
            return go
        job = c.create_job(body, idempotency_key=args.idempotency_key)
        if not args.wait:
            _print(job)
            return 0
        print(f"submitted job {job.id}", file=sys.stderr)
        return _wait(c, job.id, args.quiet, args.timeout, args.json)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the job: a summary (status, stage, progress, error, metrics), or with --json the job object."""
    with _client(args) as c:
        job = c.get_job(args.job_id)
    if args.json:
        _print(job)
        return 0
    print(f"job {job.id} {job.status}  stage {job.stage or '-'}  {100 * job.progress:.1f}%  created {job.created_at}")
    if job.metadata:
        print("  metadata: " + ", ".join(f"{k}={v}" for k, v in job.metadata.items()))
    _summary(job, file=sys.stdout)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Follow the job's events with a progress bar until it is terminal; exit 0 only if it succeeded."""
    with _client(args) as c:
        return _wait(c, args.job_id, args.quiet, args.timeout)


def cmd_download(args: argparse.Namespace) -> int:
    """Download the job's artifacts (sha256-checked) into --out."""
    with _client(args) as c:
        job = c.get_job(args.job_id)
        if job.status != "succeeded":
            print(f"error: job {job.id} is {job.status}; only succeeded jobs have artifacts", file=sys.stderr)
            return 1
        for name, path in c.download(args.job_id, args.out).items():
            print(f"{name}\t{path}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Request cancellation (idempotent); prints the job's status."""
    with _client(args) as c:
        job = c.cancel_job(args.job_id)
    print(f"job {job.id} {job.status}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List your jobs (every page): id, status, stage, progress, created; with --json a JSON array of jobs."""
    try:
        metadata = _metadata(args.metadata)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with _client(args) as c:
        jobs = c.iter_jobs(status=args.status, metadata=metadata or None)
        if args.json:
            _print(list(jobs))
            return 0
        for j in jobs:
            print(f"{j.id}  {j.status:<10} {j.stage or '-':<10} {100 * j.progress:5.1f}%  {j.created_at}")
    return 0


def add_jobs_parser(sub: Any) -> None:
    """Add the ``jobs`` command group to an argparse sub-parser collection."""
    j = sub.add_parser(
        "jobs",
        help="submit, follow, download and cancel jobs on a running service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="API root (default $RSAE_URL or http://127.0.0.1:8000)")
    common.add_argument("--token", default=None, help="bearer token (default $RSAE_TOKEN)")
    js = j.add_subparsers(dest="jobs_cmd", required=True)

    s = js.add_parser("submit", help=cmd_submit.__doc__, parents=[common])
    s.add_argument(
        "--teacher",
        default=None,
        help="teacher SAE folder to upload: SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + "
        "sae.safetensors), Gemma Scope (params.npz) or dictionary_learning (ae.pt + config.json)",
    )
    s.add_argument(
        "--format",
        default=None,
        choices=["saelens", "sparsify", "gemma_scope", "dictionary_learning"],
        help="the teacher folder's format (default: detected from its files)",
    )
    s.add_argument("--sae-id", default=None, help="id of an SAE uploaded earlier")
    s.add_argument("--hub-repo", default=None, help="teacher on the hub: repo id 'org/name'")
    s.add_argument("--hub-subfolder", default=None, help="folder of the SAE inside --hub-repo")
    s.add_argument("--hub-revision", default=None, help="branch, tag or commit of --hub-repo")
    s.add_argument("--hub-release", default=None, help="teacher on the hub: SAELens release name")
    s.add_argument("--hub-sae-id", default=None, help="SAE id within --hub-release")
    s.add_argument("--name", default=None, help="label of the uploaded teacher")
    s.add_argument(
        "--metadata", action="append", default=None, metavar="KEY=VALUE", help="a label of the job (repeatable)"
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="with --wait: print the final job as JSON; with --estimate-only: the estimate",
    )
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--layer", type=int, default=None, help="block index L (default: the teacher's cfg hook_name)")
    s.add_argument("--hook", default=None, help="hook site, e.g. blocks.5.hook_mlp_out (default: the teacher's)")
    s.add_argument("--settings", default=None, help="JSON object of job settings (see POST /jobs)")
    s.add_argument("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
    s.add_argument("--webhook-url", default=None, help="POST a signed notice here when the job ends")
    s.add_argument(
        "--webhook-secret",
        default=os.environ.get("RSAE_WEBHOOK_SECRET"),
        help="Standard Webhooks signing secret of the notice: 'whsec_<base64>' or any string of 16+ characters, "
        "whose UTF-8 bytes are the key (default $RSAE_WEBHOOK_SECRET)",
    )
    s.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the job's estimate (with --json: as JSON) and submit nothing; exit 0 if the server would accept "
        "the job, 1 if not (a teacher uploaded for it is deleted again)",
    )
    s.add_argument("--yes", "-y", action="store_true", help="submit without asking, whatever the estimate's time")
    s.add_argument(
        "--confirm-over",
        type=float,
        default=float(os.environ.get("RSAE_CONFIRM_SECONDS", DEFAULT_CONFIRM_SECONDS)),
        metavar="SECONDS",
        help="ask before submitting a job expected to take longer than this (default $RSAE_CONFIRM_SECONDS or "
        f"{DEFAULT_CONFIRM_SECONDS:.0f})",
    )
    s.add_argument("--wait", action="store_true", help="follow the job until it ends")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    s.set_defaults(func=cmd_submit)

    for name, func in (("status", cmd_status), ("wait", cmd_wait), ("cancel", cmd_cancel)):
        p = js.add_parser(name, help=func.__doc__, parents=[common])
        p.add_argument("job_id")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the job object as JSON")
        if name == "wait":
            p.add_argument("--quiet", action="store_true", help="no progress bar")
            p.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
        p.set_defaults(func=func)
    d = js.add_parser("download", help=cmd_download.__doc__, parents=[common])
    d.add_argument("job_id")
    d.add_argument("--out", required=True, help="destination folder")
    d.set_defaults(func=cmd_download)
    ls = js.add_parser("list", help=cmd_list.__doc__, parents=[common])
    ls.add_argument("--status", default=None, choices=sorted(JOB_STATUSES))
    ls.add_argument(
        "--metadata", action="append", default=None, metavar="KEY=VALUE", help="only jobs with this label (repeatable)"
    )
    ls.add_argument("--json", action="store_true", help="print a JSON array of the jobs")
    ls.set_defaults(func=cmd_list)
    for parser in (s, d, ls, *(js.choices[n] for n in ("status", "wait", "cancel"))):
        cmd = parser.get_default("func")
        parser.set_defaults(func=functools.partial(run, cmd))


def register(sub: Any) -> None:
    """The ``rsae.cli`` plugin entry point (``pyproject.toml`` ``[project.entry-points."rsae.cli"]``): adds
    ``rsae jobs ...``, whose commands turn API and connection errors into messages and exit code 2."""
    add_jobs_parser(sub)


def run(func: Any, args: argparse.Namespace) -> int:
    """Run a ``jobs`` command, turning API and connection errors into messages and exit code 2."""
    import httpx

    try:
        return func(args)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except httpx.TransportError as e:
        print(f"error: cannot reach the service: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
