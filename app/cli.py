"""The `lego` command: serve, worker, keys, migrate (+ lego_core's algorithm commands)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from app.settings import Settings, get_settings


def _log_setup(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _migrate(settings: Settings) -> None:
    from app.catalog import upgrade

    upgrade(settings.resolved_database_url)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.auth import any_key, create_key, ensure_key
    from app.catalog import get_catalog
    from app.main import create_app

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    _log_setup()
    _migrate(settings)
    catalog = get_catalog(settings.resolved_database_url)
    if settings.bootstrap_api_key:
        ensure_key(catalog, settings.bootstrap_api_key, "bootstrap", settings.bootstrap_owner)
    fresh = None
    if settings.embedded_broker and not any_key(catalog):
        with catalog.session() as s:
            fresh = create_key(s, "default", settings.bootstrap_owner)
    mode = (
        "embedded (SQLite/local storage, in-process job runner)"
        if settings.embedded_broker and not settings.database_url
        else ("in-process job runner" if settings.embedded_broker else "full stack (Celery)")
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"Model LEGO API: http://{shown}:{port}  (docs: http://{shown}:{port}/docs)")
    print(
        f"Mode: {mode}; catalog {catalog.engine.url.render_as_string(hide_password=True)}; "
        f"artifacts {settings.resolved_storage_dir}"
    )
    if fresh:
        print(f"API key (created now, shown once): {fresh}")
        print(f"  try: curl -H 'Authorization: Bearer {fresh}' http://{shown}:{port}/api/v1/models")
    processes = args.processes or settings.api_processes
    if processes > 1:
        # Each process builds its own app from the same LEGO_* environment (the catalog is
        # migrated above, once); they share the port, the catalog and the artifacts, and
        # every process batches its own share of the predict requests.
        print(f"API processes: {processes}")
        sys.stdout.flush()
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=processes,
            log_level="info",
            # A process answers the supervisor's ping only once its imports (torch) are
            # done: on a busy machine that takes longer than uvicorn's 5 s, and it would
            # kill and restart the process again and again.
            timeout_worker_healthcheck=120,
        )
        return 0
    sys.stdout.flush()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0


def worker_queues(args: argparse.Namespace, settings: Settings) -> str:
    """The queues `lego worker` consumes: --queues, else LEGO_WORKER_QUEUES, else the CPU queue."""
    return args.queues or settings.worker_queues or settings.cpu_queue


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.embedded_broker:
        print(
            "lego worker needs LEGO_BROKER_URL (e.g. redis://localhost:6379/0); without a "
            "broker, `lego serve` runs the jobs itself.",
            file=sys.stderr,
        )
        return 2
    _log_setup(args.loglevel)
    _migrate(settings)

    from worker.beacon import Beacon
    from worker.celery_app import celery, queue_empty, send
    from worker.runtime import Env, Reaper

    Beacon(settings).start()
    Reaper(
        Env.from_settings(settings),
        lambda job_id: send(settings, job_id),
        lambda: queue_empty(settings),
    ).start()
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--concurrency={args.concurrency or settings.worker_concurrency}",
        f"--queues={worker_queues(args, settings)}",
        f"--pool={args.pool}",
        f"--hostname=lego-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    celery.worker_main(argv)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from app.auth import create_key, list_keys, revoke_key
    from app.catalog import get_catalog

    settings = get_settings()
    _migrate(settings)
    catalog = get_catalog(settings.resolved_database_url)
    where = catalog.engine.url.render_as_string(hide_password=True)
    with catalog.session() as s:
        if args.keys_cmd == "create":
            key = create_key(s, args.name, args.owner)
            # The key alone on stdout (for scripts); what it is and where it went on stderr.
            print(key)
            print(
                f"created key {args.name!r} (owner {args.owner or args.name!r}) in catalog "
                f"{where}; a server must use the same catalog (LEGO_DATABASE_URL or "
                f"LEGO_VAR_DIR) to accept it",
                file=sys.stderr,
            )
        elif args.keys_cmd == "revoke":
            n = revoke_key(s, args.key)
            if not n:
                print(f"no active key matches {args.key!r}", file=sys.stderr)
                return 1
            print(f"revoked {n} key(s) in catalog {where}")
        else:
            print(f"catalog {where}", file=sys.stderr)
            for k in list_keys(s):
                state = "revoked" if k.revoked_at else "active"
                print(f"{k.id}\t{k.name}\towner={k.owner}\t{k.prefix}...\t{state}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from worker.beacon import alive_workers, this_host

    settings = get_settings()
    if settings.embedded_broker:
        print("no broker (LEGO_BROKER_URL): `lego serve` runs the jobs itself", file=sys.stderr)
        return 2
    alive = alive_workers(settings)
    for name in alive:
        print(name)
    if args.this_host:
        return 0 if any(n.rsplit(":", 1)[0] == this_host() for n in alive) else 1
    return 0 if alive else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.catalog import current_revision, downgrade, upgrade

    url = get_settings().resolved_database_url
    if args.downgrade:
        downgrade(url, args.downgrade)
    else:
        upgrade(url, args.revision)
    print(f"catalog at revision {current_revision(url)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lego", description="Model LEGO as a service")
    sub = p.add_subparsers(dest="command", required=True)

    p.epilog = (
        "Settings come from LEGO_* environment variables (docs/service.md); without "
        "LEGO_DATABASE_URL the catalog is var/lego.db of this checkout (LEGO_VAR_DIR)."
    )
    s = sub.add_parser(
        "serve",
        help="run the HTTP API (applies migrations first)",
        description="Run the HTTP API under uvicorn. Applies catalog migrations, creates the "
        "LEGO_BOOTSTRAP_API_KEY key if set, and in embedded mode (no LEGO_BROKER_URL) runs "
        "jobs in-process and prints a new key on first start.",
    )
    s.add_argument("--host", default=None, help="interface to listen on (default LEGO_HOST)")
    s.add_argument("--port", type=int, default=None, help="port (default LEGO_PORT, 8000)")
    s.add_argument(
        "--processes",
        type=int,
        default=None,
        help="API processes on the port, each micro-batching its own requests "
        "(default LEGO_API_PROCESSES, 1)",
    )
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser(
        "worker",
        help="run a Celery worker (full stack; applies migrations)",
        description="Run a Celery worker that executes locate and assemble jobs (needs "
        "LEGO_BROKER_URL), with a reaper thread and a liveness beacon in Redis.",
    )
    w.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs run at once (default LEGO_WORKER_CONCURRENCY)",
    )
    w.add_argument(
        "--queues",
        default=None,
        help="comma-separated (default LEGO_WORKER_QUEUES, else LEGO_CPU_QUEUE)",
    )
    w.add_argument(
        "--pool",
        default="prefork",
        choices=("prefork", "solo", "threads"),
        help="Celery pool (default prefork: one process per job)",
    )
    w.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    w.set_defaults(func=cmd_worker)

    ws = sub.add_parser(
        "workers",
        help="list live workers (exit 1 when none)",
        description="Print the workers whose beacon in Redis is fresh; exit status 1 when "
        "there is none (or, with --this-host, none on this host: a container healthcheck).",
    )
    ws.add_argument("--this-host", action="store_true", help="only succeed for this host")
    ws.set_defaults(func=cmd_workers)

    k = sub.add_parser(
        "keys",
        help="API keys",
        description="Manage API keys in the catalog the server uses (the same LEGO_* "
        "settings); each command says which catalog it used.",
    )
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key and print it (shown once)")
    kc.add_argument("name", help="a label for the key")
    kc.add_argument("--owner", default=None, help="whose resources it sees (default: NAME)")
    kr = ksub.add_parser("revoke", help="revoke by key, id, name or prefix")
    kr.add_argument("key", help="the key itself, its id, its name or its prefix")
    ksub.add_parser("list", help="list keys (never the keys themselves)")
    k.set_defaults(func=cmd_keys)

    m = sub.add_parser(
        "migrate",
        help="apply catalog migrations",
        description="Upgrade the catalog (LEGO_DATABASE_URL, default var/lego.db) to a "
        "revision, or downgrade it.",
    )
    m.add_argument("--revision", default="head", help="target revision (default head)")
    m.add_argument("--downgrade", default=None, metavar="REV", help="downgrade to REV instead")
    m.set_defaults(func=cmd_migrate)

    try:
        from lego_core.cli import add_commands
    except ImportError:
        add_commands = None
    if add_commands is not None:
        add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
