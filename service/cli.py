"""rsae-service: migrate, serve, worker, up (embedded stack), demo.

Examples:

    rsae-service migrate                      # alembic upgrade head on RSAE_DATABASE_URL
    rsae-service serve --host 0.0.0.0         # migrate, then uvicorn (needs RSAE_BROKER_URL)
    rsae-service worker                       # Celery worker on queue 'gpu', concurrency 1, prefork
    rsae-service encode-worker                # long-lived encode worker on queue 'encode' (models kept loaded)
    rsae-service up                           # one machine: own Redis (if RSAE_BROKER_URL unset), SQLite
                                              # (if RSAE_DATABASE_URL unset), worker and API; Ctrl-C stops
    rsae-service up --local-paths             # ... and jobs may read paths under RSAE_LOCAL_PATH_ROOTS
    rsae-service demo                         # train a teacher, upgrade it over HTTP, print the metrics
    rsae-service token create --user alice    # print a new API token for alice (shown once)
    rsae-service token list                   # tokens: prefix, user, label, created, last used, revoked
    rsae-service token revoke --prefix rsae_AbC1234
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from .config import ConfigError, get_settings


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so the embedded stack's children are stopped on the way out."""

    def handler(signum: int, frame: Any) -> None:
        """Raise KeyboardInterrupt in the main thread."""
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the database schema to the newest Alembic revision."""
    from .migrate import upgrade

    upgrade(get_settings().database_url, wait_seconds=args.wait)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API with uvicorn (after migrating, unless ``--no-migrate``), with the connection limits of
    :func:`service.httpserver.server_limits`: RSAE_MAX_HEADER_BYTES, RSAE_HEADER_TIMEOUT_SECONDS,
    RSAE_KEEP_ALIVE_SECONDS, RSAE_MAX_CONCURRENCY."""
    import uvicorn

    from .httpserver import server_limits

    settings = get_settings()
    settings.require_broker()
    if not args.no_migrate:
        cmd_migrate(args)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        **server_limits(settings),  # head size and read timeout, keep-alive, concurrency (RSAE_* settings)
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker on the job queue (concurrency 1, prefork), or with ``encode-worker`` the encode worker
    on the encode queue; extra arguments pass through."""
    from .queue import run_worker

    extra = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    run_worker(get_settings(), extra, encode=args.command == "encode-worker")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Run the embedded stack until Ctrl-C."""
    from .embedded import Stack

    _interrupt_on_sigterm()
    with Stack(get_settings(), host=args.host, port=args.port, local_paths=args.local_paths) as stack:
        print(f"RSAE service ready at {stack.base_url}  (docs: {stack.base_url}/docs; Ctrl-C stops)", flush=True)
        try:
            stack.wait()
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command: a whole upgrade over HTTP on the bundled model and text."""
    from .demo import run_demo

    _interrupt_on_sigterm()
    return run_demo(port=args.port, timeout=args.timeout)


def cmd_token(args: argparse.Namespace) -> int:
    """Create, list or revoke API tokens, directly in the database (run where the database is reachable)."""
    from sqlalchemy import select

    from .auth import issue_token, revoke_tokens
    from .db import get_sessionmaker
    from .models import ApiToken, User

    make_session = get_sessionmaker(get_settings().database_url)
    if args.action == "create":
        try:
            with make_session.begin() as s:
                issued = issue_token(s, args.user, args.name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"# token for user {issued.user_name!r} (prefix {issued.prefix}); it is shown only now", file=sys.stderr)
        print(issued.token)
        return 0
    if args.action == "list":
        with make_session() as s:
            rows = s.execute(
                select(ApiToken, User.name).join(User, User.id == ApiToken.user_id).order_by(ApiToken.created_at)
            )
            print(f"{'prefix':<13} {'user':<20} {'label':<16} {'created':<20} {'last used':<20} revoked")

            def fmt(t):
                return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"

            for tok, user in rows:
                print(
                    f"{tok.prefix:<13} {user:<20} {tok.name or '-':<16} {fmt(tok.created_at):<20} "
                    f"{fmt(tok.last_used_at):<20} {fmt(tok.revoked_at)}"
                )
        return 0
    if args.prefix is None and args.user is None:
        print("error: give --prefix or --user", file=sys.stderr)
        return 2
    with make_session.begin() as s:
        n = revoke_tokens(s, prefix=args.prefix, user_name=args.user)
    print(f"revoked {n} token(s)")
    return 0 if n else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rsae-service``."""
    p = argparse.ArgumentParser(
        prog="rsae-service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="alembic upgrade head (waits for the database first)")
    m.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the database")
    m.set_defaults(func=cmd_migrate)

    s = sub.add_parser("serve", help="run the API (uvicorn), migrating first")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    s.add_argument("--no-migrate", action="store_true", help="skip the prestart migration")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the database")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser(
        "worker",
        help="run a Celery worker on the job queue",
        description="Extra arguments after the subcommand go to 'celery worker'.",
    )
    w.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery worker")
    w.set_defaults(func=cmd_worker)

    e = sub.add_parser(
        "encode-worker",
        help="run the long-lived encode worker (queue 'encode'; keeps models and SAEs loaded)",
        description="Serves POST /v1/jobs/{id}/encode and POST /v1/saes/{id}/encode. Extra arguments after the "
        "subcommand go to 'celery worker'.",
    )
    e.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery worker")
    e.set_defaults(func=cmd_worker)

    u = sub.add_parser("up", help="one machine: own Redis if needed, migrate, worker + API")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument(
        "--local-paths",
        action="store_true",
        help="accept server-side paths under RSAE_LOCAL_PATH_ROOTS in job requests (one user on this machine: "
        "needs a loopback --host and at most one user with tokens)",
    )
    u.set_defaults(func=cmd_up)

    d = sub.add_parser("demo", help="train a teacher, upgrade it over HTTP, print before/after metrics")
    d.add_argument("--port", type=int, default=0, help="API port (0: a free one)")
    d.add_argument("--timeout", type=float, default=3 * 3600, help="seconds to wait for the job")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("token", help="create, list or revoke API tokens")
    tsub = t.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create", help="print a new token for a user (created if missing)")
    tc.add_argument("--user", required=True, help="user name (letters, digits, '._@-')")
    tc.add_argument("--name", help="label of the token, e.g. the machine it is for")
    tsub.add_parser("list", help="list tokens (prefixes only; secrets are never stored)")
    tr = tsub.add_parser("revoke", help="revoke tokens by prefix and/or user")
    tr.add_argument("--prefix", help="the token's first 12 characters (as listed)")
    tr.add_argument("--user", help="revoke every token of this user")
    t.set_defaults(func=cmd_token)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rsae-service``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "alembic.runtime.plugins"):  # one line per request/plugin drowns the output
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
