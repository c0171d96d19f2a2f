"""Command line: ``python -m api serve|worker|migrate|tenants|openapi``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from api.auth.secrets import Keyring, resolve_secret_key
from api.config import Settings, SettingsError, load_settings
from api.db import Database
from api.db.embedded import EmbeddedPostgres, start_embedded
from api.db.migrate import MigrationError, migrate, migration_status
from api.logs import configure_logging, dict_config
from api.tenants import lifecycle

log = logging.getLogger("sjaak.cli")
T = TypeVar("T")


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured URL, or the embedded server's (started now, stopped on the way out)."""
    if settings.database_url:
        yield settings.database_url
        return
    server: EmbeddedPostgres = start_embedded(settings.data_dir)
    try:
        yield server.url()
    finally:
        server.stop()


@asynccontextmanager
async def connected(url: str, settings: Settings, **pool: Any) -> AsyncIterator[Database]:
    db = await Database.connect(url, statement_timeout_ms=settings.statement_timeout_ms, **pool)
    try:
        yield db
    finally:
        await db.close()


def run_with_db(settings: Settings, url: str, work: Callable[[Database], Awaitable[T]]) -> T:
    async def main() -> T:
        async with connected(
            url, settings, min_size=1, max_size=max(2, settings.migrate_concurrency + 1)
        ) as db:
            return await work(db)

    return asyncio.run(main())


def print_progress(done: int, total: int, failed: int) -> None:
    step = max(1, total // 20)
    if done == total or done % step == 0:
        print(f"  shops migrated: {done}/{total} ({failed} failed)", file=sys.stderr, flush=True)


async def migrate_and_report(db: Database, settings: Settings) -> bool:
    report = await migrate(db, concurrency=settings.migrate_concurrency, on_progress=print_progress)
    for name in report.control_applied:
        print(f"  control migration applied: {name}", file=sys.stderr)
    print(
        f"migrate: control schema up to date; {report.shops_migrated} of {report.shops_total} "
        f"shop(s) brought up to date in {report.seconds:.2f}s",
        file=sys.stderr,
    )
    for schema, error in report.shops_failed.items():
        print(f"  FAILED {schema}: {error}", file=sys.stderr)
    if report.shops_failed:
        print(
            f"migrate: {len(report.shops_failed)} shop(s) failed and were left unchanged; "
            "fix the cause and run migrate again to finish them",
            file=sys.stderr,
        )
    return report.ok


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    with database_url(settings) as url:
        if args.status:
            status = run_with_db(settings, url, lambda db: migration_status(db))
            print(
                json.dumps(
                    {
                        "control_version": status.control_version,
                        "control_latest": status.control_latest,
                        "tenant_latest": status.tenant_latest,
                        "shops_by_version": {
                            str(k): v for k, v in sorted(status.shops_by_version.items())
                        },
                        "shops_behind": status.shops_behind,
                        "up_to_date": status.up_to_date,
                    },
                    indent=2,
                )
            )
            return 0 if status.up_to_date else 1
        ok = run_with_db(settings, url, lambda db: migrate_and_report(db, settings))
        return 0 if ok else 1


def tenant_json(record: lifecycle.TenantRecord) -> dict[str, Any]:
    return {
        "id": str(record.id),
        "name": record.name,
        "schema": record.schema_name,
        "status": record.status,
        "schema_version": record.schema_version,
        "created_at": record.created_at.isoformat(),
    }


def cmd_tenants(settings: Settings, args: argparse.Namespace) -> int:
    keyring = Keyring.from_settings(settings)

    async def act(db: Database) -> Any:
        await migrate(db)  # a tenant command on a fresh database must still work
        match args.action:
            case "create":
                shop = await lifecycle.provision_shop(db, keyring, args.name)
                return {
                    **tenant_json(shop.tenant),
                    "secret_key": shop.secret_key,
                    "publishable_key": shop.publishable_key,
                }
            case "list":
                return [
                    tenant_json(r)
                    for r in await lifecycle.list_tenants(db, include_deleted=args.all)
                ]
            case "suspend":
                return tenant_json(
                    await lifecycle.suspend_tenant(db, UUID(args.id), reason=args.reason)
                )
            case "resume":
                return tenant_json(await lifecycle.resume_tenant(db, UUID(args.id)))
            case "export":
                from api.tenants.export import export_shop

                record = await lifecycle.get_tenant(db, UUID(args.id))
                return await export_shop(db, record, Path(args.directory))
            case "delete":
                return tenant_json(
                    await lifecycle.delete_tenant(db, UUID(args.id), confirm=args.confirm)
                )
        raise AssertionError(args.action)

    with database_url(settings) as url:
        try:
            result = run_with_db(settings, url, act)
        except (
            lifecycle.TenantNotFound,
            lifecycle.ConfirmationRequired,
            ValueError,
            FileExistsError,
        ) as exc:
            print(f"tenants {args.action}: {exc}", file=sys.stderr)
            return 2
    if getattr(args, "json", False) or args.action in ("list", "export"):
        print(json.dumps(result, indent=None if args.action != "list" else 2))
    else:
        print(f"{result['name']}: id {result['id']}, schema {result['schema']}, {result['status']}")
    return 0


def cmd_openapi(settings: Settings, args: argparse.Namespace) -> int:
    from api.app import create_app

    app = create_app(settings)
    print(json.dumps(app.openapi_schema.to_schema(), indent=2, sort_keys=True))
    return 0


def print_demo_shop(
    settings: Settings, shop: lifecycle.TenantRecord, created: lifecycle.ProvisionedShop | None
) -> None:
    """Show the demo shop's keys. Keys are only ever stored hashed, so for the next start of a
    development server they are kept (0600) in the data directory, never in production."""
    keys_file = Path(settings.data_dir).expanduser() / "demo_keys.json"
    keys: dict[str, str] = {}
    if created is not None:
        keys = {"secret_key": created.secret_key, "publishable_key": created.publishable_key}
        if settings.environment == "development":
            keys_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"tenant_id": str(shop.id), **keys}, handle)
    elif keys_file.exists():
        saved = json.loads(keys_file.read_text())
        if saved.get("tenant_id") == str(shop.id):
            keys = {k: saved[k] for k in ("secret_key", "publishable_key")}
    verb = "created" if created else "found"
    print(f"demo shop {verb}: {json.dumps({**tenant_json(shop), **keys})}", file=sys.stderr)
    if keys:
        print(
            "try: curl -H 'Authorization: Bearer "
            f"{keys['secret_key']}' http://{settings.host}:{settings.port}/v1/api-keys",
            file=sys.stderr,
        )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    host = args.host or settings.host
    port = args.port or settings.port
    workers = args.workers or settings.workers
    keyring = Keyring.from_settings(settings)
    with database_url(settings) as url:

        async def prepare(db: Database) -> None:
            if not await migrate_and_report(db, settings):
                raise MigrationError("some shops failed to migrate; see above")
            if settings.seed_demo:
                shop, created = await lifecycle.ensure_demo_tenant(db, keyring)
                print_demo_shop(settings, shop, created)

        run_with_db(settings, url, prepare)
        # The workers are separate processes; they find the database through the environment.
        os.environ["SJAAK_DATABASE_URL"] = url
        os.environ["SJAAK_SECRET_KEY"] = resolve_secret_key(settings)
        # Ctrl-C reaches both processes (one terminal, one process group); the worker stops itself
        # and is waited for before the embedded server stops.
        worker = start_worker_process() if args.with_worker else None
        print(
            f"serving on http://{host}:{port} (API docs at http://{host}:{port}/schema)"
            + (", background worker running" if worker else ""),
            file=sys.stderr,
            flush=True,
        )
        try:
            serve_http(settings, host, port, workers)
        finally:
            if worker is not None:
                stop_worker_process(worker)
    return 0


def serve_http(settings: Settings, host: str, port: int, workers: int) -> None:
    from granian import Granian
    from granian.constants import Interfaces

    Granian(
        "api.asgi:app_from_env",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        log_access=False,
        workers_kill_timeout=30,
        log_dictconfig=dict_config(settings.log_level),
    ).serve()


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from api.db.queue import connect_queue_pool
    from api.jobs import JobContext
    from api.worker import run_worker

    keyring = Keyring.from_settings(settings)

    with database_url(settings) as url:

        async def work(db: Database) -> None:
            await migrate(db)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            pool = await connect_queue_pool(url)
            try:
                await run_worker(JobContext(settings, db, keyring), pool, stop)
            finally:
                await pool.close()

        run_with_db(settings, url, work)
    return 0


def start_worker_process() -> subprocess.Popen[bytes]:
    """``python -m api worker`` beside ``serve``; it finds the database through the environment
    ``serve`` has set, so an embedded server is started once, by ``serve``."""
    return subprocess.Popen([sys.executable, "-m", "api", "worker"])


def stop_worker_process(worker: subprocess.Popen[bytes]) -> None:
    """Ask the worker to stop (it finishes running jobs), and wait for it."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        code = worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        code = worker.wait()
    if code not in (0, 130):
        print(f"worker exited with status {code}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api", description="Sjaak service commands")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="migrate, seed the demo shop and serve HTTP")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument(
        "--with-worker",
        action="store_true",
        help="also run the background worker (`make run`), stopped together with the server",
    )
    serve.set_defaults(handler=cmd_serve)

    sub.add_parser("worker", help="run background jobs").set_defaults(handler=cmd_worker)

    mig = sub.add_parser("migrate", help="bring the control schema and every shop up to date")
    mig.add_argument("--status", action="store_true", help="report only; exit 1 if behind")
    mig.set_defaults(handler=cmd_migrate)

    tenants = sub.add_parser("tenants", help="manage shops")
    tsub = tenants.add_subparsers(dest="action", required=True)
    create = tsub.add_parser("create", help="provision a shop")
    create.add_argument("name")
    create.add_argument("--json", action="store_true")
    lst = tsub.add_parser("list", help="list shops as JSON")
    lst.add_argument("--all", action="store_true", help="include deleted shops")
    suspend = tsub.add_parser("suspend", help="block a shop's requests")
    suspend.add_argument("id")
    suspend.add_argument("--reason")
    suspend.add_argument("--json", action="store_true")
    resume = tsub.add_parser("resume", help="serve a suspended shop again")
    resume.add_argument("id")
    resume.add_argument("--json", action="store_true")
    export = tsub.add_parser("export", help="write a shop's data as JSON Lines into DIR/<schema>")
    export.add_argument("id")
    export.add_argument("directory")
    delete = tsub.add_parser("delete", help="drop a shop's schema and data")
    delete.add_argument("id")
    delete.add_argument("--confirm", action="store_true", help="required: deletion is final")
    delete.add_argument("--json", action="store_true")
    tenants.set_defaults(handler=cmd_tenants)

    sub.add_parser("openapi", help="print the OpenAPI spec").set_defaults(handler=cmd_openapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command != "openapi":
        configure_logging(settings.log_level)
    try:
        code: int = args.handler(settings, args)
    except MigrationError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
