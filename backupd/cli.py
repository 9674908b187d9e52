"""Command line: parse arguments, build what a command needs, print, exit.

Each command is a small function taking the parsed arguments; the dispatch
is the `func` default set by its subparser. Errors a user can act on are
BackupdError: printed as one line, exit code from the error's class.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from backupd import __version__, interrupts
from backupd.catalog import SUCCEEDED, PARTIAL, BackupSummary, BackupView, Catalog
from backupd.config import Config, default_config_path, load_config

if TYPE_CHECKING:
    from backupd.app import App
from backupd.errors import BackupdError, ConfigError, IntegrityError, PartialError
from backupd.gcpause import paused_gc
from backupd.logs import setup_logging
from backupd.redaction import redact
from backupd.stream import human_bytes
from backupd.table import format_table

log = logging.getLogger("backupd")

EXIT_FAILED = 1


class Context:
    """Loads the config and builds the App on first use, so `--help` and `config check` stay cheap."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._config: Config | None = None
        self._app: App | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.args.config or default_config_path())
        return self._config

    @property
    def app(self) -> App:
        if self._app is None:
            from backupd.app import App

            self._app = App(self.config, self.args.command)
        return self._app

    def with_labels(self) -> Config:
        """The config with the jobs container labels declare, read now (backupd.discovery);
        as written when discovery is off, without asking the engine."""
        if not self.config.discovery.enabled:
            return self.config
        return self.app.discover(self.config).config

    @property
    def catalog(self) -> Catalog:
        return self.app.catalog

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


# ---------------------------------------------------------------- commands


def cmd_backup(ctx: Context) -> int:
    job = ctx.args.job
    if not ctx.config.discovery.enabled:  # else container labels may declare it: App.backup decides
        ctx.config.job(job)
    result = ctx.app.backup(job, wait=0 if ctx.args.no_wait else None)
    if result.planning_error is not None:
        raise result.planning_error  # recorded failed in the catalog as result.backup_id
    print(result.backup_id)
    for warning in result.warnings:
        print(f"backupd: backup {result.backup_id} warning: {warning}", file=sys.stderr)
    if result.status == SUCCEEDED:
        return 0
    for err in result.errors:
        print(redact(f"backupd: backup {result.backup_id} {result.status}: {err}"), file=sys.stderr)
    return PartialError.exit_code if result.status == PARTIAL else EXIT_FAILED


def cmd_run(ctx: Context) -> int:
    from backupd.daemon import RUNS_LEFT, run_daemon

    from backupd.http import http_bind

    bind = http_bind(ctx.args.http, os.environ.get("BACKUPD_HTTP"), ctx.config.http)
    code = run_daemon(ctx.args.config or default_config_path(), ctx.app, bind)
    if code == RUNS_LEFT:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """Exit without waiting for threads: a run that ignored its cancel still holds a scheduler
    thread, which Python would wait for at exit, forever. What it left (a container stopped, a
    row running) is recovered by the next start."""
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def cmd_list(ctx: Context) -> int:
    if ctx.args.jobs:
        return _print_jobs(ctx)
    if ctx.args.schedule:
        return _print_schedule(ctx.with_labels(), ctx.args.json)
    if ctx.args.json:
        json.dump([b.to_json() for b in ctx.catalog.list(job=ctx.args.job)], sys.stdout, indent=2)
        print()
        return 0
    with paused_gc():
        job = ctx.args.job
        _print_summaries(ctx.catalog.summaries(job=job), ctx.catalog.longest(job=job))
    return 0


def _print_summaries(summaries: Iterable[BackupSummary], longest: tuple[int, int, int],
                     batch: int = 10_000) -> None:
    """The `list` table as the summaries stream by, a batch of lines per write: id, job and
    status as wide as the longest (from the catalog), sizes right-aligned.

    One format per line straight from the summaries: a table of cells built first (and
    transposed for its widths) cost as much as the query at 100k backups.
    """
    widths = [max(len(title), n) for title, n in zip(("ID", "JOB", "STATUS"), longest)]
    # started is stored text, 'YYYY-MM-DD HH:MM:SS[.ffffff]': %-19.19s shows it to the second.
    line = "%-{}s  %-{}s  %-{}s  %-19.19s  %10s  %s\n".format(*widths)
    sys.stdout.write(line % ("ID", "JOB", "STATUS", "STARTED", "SIZE", "ARTIFACTS"))
    rows = iter(summaries)
    while part := list(islice(rows, batch)):
        sys.stdout.write("".join([line % (i, job, status, started, human_bytes(size), n)
                                  for i, job, status, started, size, n in part]))


def cmd_show(ctx: Context) -> int:
    backup = ctx.catalog.get(ctx.args.backup_id)
    if ctx.args.json:
        json.dump(backup.to_json(), sys.stdout, indent=2)
        print()
        return 0
    print(_describe(backup))
    return 0


def cmd_restore(ctx: Context) -> int:
    args, app = ctx.args, ctx.app
    wait = 0 if args.no_wait else None
    if args.volume:
        from backupd.restore import restore_volume

        with app.hold_for_restore(args.to_volume or args.volume, None, wait):
            target = restore_volume(config=ctx.config, catalog=app.catalog, host=app.host,
                                    backup_id=args.backup_id, volume=args.volume,
                                    to_volume=args.to_volume, force=args.force, identity=args.identity)
        print(f"restored volume {args.volume} from {args.backup_id} into {target}")
        return 0
    from backupd.quiesce.restore import restore_database

    from backupd.quiesce.databases import WHOLE, parse_source

    # The job's lease: its own backups dump from the database being replaced. A SQLite or Redis
    # restore also stops its container: held, so no other run stops, starts or dumps from it meanwhile.
    backup = app.catalog.get(args.backup_id)
    container = args.to_container
    source = parse_source(backup.artifact("database", args.database).source)
    if container is None and source.kind in WHOLE and ":" not in source.server:
        container = source.server
    with app.hold_for_restore(None, container, wait, job=backup.job):
        target = restore_database(config=ctx.config, catalog=app.catalog, host=app.host,
                                  backup_id=args.backup_id, name=args.database,
                                  to_container=args.to_container, force=args.force, identity=args.identity)
    print(f"restored database dump {args.database} from {args.backup_id} into {target}")
    return 0


def cmd_verify(ctx: Context) -> int:
    from backupd.app import job_lease
    from backupd.verify import restore_drill, verify_backup

    app, backup_id = ctx.app, ctx.args.backup_id
    job = app.catalog.get(backup_id).job
    with app.leases.hold([job_lease(job)], f"verify of backup {backup_id}", on_wait=lambda c: log.info("waiting: %s", c)):
        from backupd.repository import snapshot_checker

        results = verify_backup(ctx.config, app.catalog, app.stores(), backup_id, ctx.args.identity,
                                check_snapshot=snapshot_checker(ctx.config, lambda: app.host))
        for r in results:
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.artifact} on {r.destination}: {r.detail}")
        bad = [r for r in results if not r.ok]
        if ctx.args.restore and not bad:
            for name in restore_drill(ctx.config, app.catalog, app.host, backup_id, ctx.args.identity):
                print(f"ok   volume {name}: restored into a scratch volume and removed")
    if bad or not results:
        raise IntegrityError(f"backup {ctx.args.backup_id}: {len(bad)} of {len(results)} copies failed verification")
    return 0


def cmd_prune(ctx: Context) -> int:
    from backupd.retention import summarize

    args, app = ctx.args, ctx.app
    if args.orphans:
        return _prune_orphans(app, args.dry_run, args.delete)
    config = ctx.with_labels()
    jobs = [args.job] if args.job else [j for j in config.jobs if config.job_retention(j)]
    if args.job:
        config.job(args.job)
    failures = []
    for job in jobs:
        # A dry run deletes nothing, so it opens no destination (nor imports boto3/paramiko).
        report = app.prune(job, config=config, dry_run=args.dry_run)
        print(f"job {job}{' (dry run: nothing deleted)' if args.dry_run else ''}")
        with paused_gc():
            print(summarize(report.decisions))
        if not args.dry_run:
            print(f"deleted {len(report.deleted)} backup(s)")
        if args.compact and not args.dry_run:
            for line in app.compact(job, config=config):
                print(line)
                if "prune failed" in line:
                    failures.append(f"compaction of job {job}: {line}")
        failures += report.failures
    for failure in failures:
        print(redact(f"backupd: could not delete {failure}"), file=sys.stderr)
    return EXIT_FAILED if failures else 0


def _prune_orphans(app: App, dry_run: bool, delete: bool) -> int:
    """Leftovers of interrupted uploads (removed unless dry), objects the catalog does not
    know (deleted only with --delete), copies whose object vanished (marked missing)."""
    from backupd.prune import find_orphans

    swept = app.sweep_leftovers(dry_run=dry_run)
    for found in swept.found:
        if found.keep is not None:
            state = f"kept: {found.keep}"
        else:
            state = "would be removed" if dry_run else "removed" if found in swept.removed else "NOT removed"
        print(f"leftover {found.describe()}: {state}")
    report = find_orphans(app.catalog, app.stores(), delete=delete, dry_run=dry_run)
    for dest, key in report.orphans:
        done = " (deleted)" if (dest, key) in report.removed else " (would be deleted)" if dry_run and delete else ""
        print(f"orphan   {dest}: {key}{done}")
    for backup_id, dest, key in report.missing:
        print(f"missing  {dest}: {key} (backup {backup_id}; "
              f"{'would be marked missing' if dry_run else 'marked missing'})")
    if not swept.found and not report.orphans and not report.missing:
        print("no leftovers, no orphans, no missing copies")
    for failure in swept.failures:
        print(redact(f"backupd: leftovers on {failure}"), file=sys.stderr)
    return EXIT_FAILED if swept.failures else 0


def cmd_catalog_rebuild(ctx: Context) -> int:
    from backupd.prune import rebuild_catalog

    dest = ctx.args.destination
    if dest not in ctx.config.destinations:
        raise ConfigError(f"--destination: '{dest}' is not defined (defined: {', '.join(ctx.config.destinations)})")
    imported, skipped = rebuild_catalog(ctx.catalog, dest, ctx.app.stores([dest])[dest])
    print(f"imported {len(imported)} backup(s) from {dest}; {len(skipped)} already in the catalog")
    for job in [j for j, spec in ctx.config.jobs.items()
                if spec.format == "repository" and dest in ctx.config.job_destinations(j)]:
        from backupd.app import job_lease
        from backupd.repository import rebuild_from_repository

        with ctx.app.leases.hold([job_lease(job)], f"catalog rebuild of job {job}",
                                 on_wait=lambda c: log.info("waiting: %s", c)):  # no backup writes meanwhile
            imported, skipped = rebuild_from_repository(ctx.config, ctx.catalog, ctx.app.host, job, dest)
        print(f"imported {len(imported)} backup(s) of job {job} from its repository on {dest}; "
              f"{len(skipped)} already in the catalog")
    return 0


def cmd_accept(ctx: Context) -> int:
    """Trust a backup the shrinkage guard flagged: it counts as succeeded again."""
    catalog, backup_id = ctx.catalog, ctx.args.backup_id
    backup = catalog.get(backup_id)
    if backup.suspicion is None:
        print(f"backup {backup_id} is not suspicious; nothing to accept")
        return 0
    catalog.set_suspicion(backup_id, None)
    catalog.add_warnings(backup_id, [f"accepted by an operator despite: {backup.suspicion}"])
    log.info("backup %s accepted; retention of job %s runs again", backup_id, backup.job,
             extra={"backup_id": backup_id, "job": backup.job})
    print(f"accepted backup {backup_id}")
    return 0


def cmd_config_check(ctx: Context) -> int:
    config = ctx.config
    path = ctx.args.config or default_config_path()
    print(f"{path}: ok ({len(config.jobs)} job(s), {len(config.destinations)} destination(s))")
    return 0


# ---------------------------------------------------------------- output helpers


def _print_schedule(config: Config, as_json: bool) -> int:
    from backupd.catalog import utcnow
    from backupd.scheduler import next_runs

    runs = next_runs(config, utcnow())
    if as_json:
        json.dump([{"job": e.job, "action": e.action, "schedule": e.cron, "timezone": e.timezone,
                    "next_run": t.isoformat() if t else None} for e, t in runs], sys.stdout, indent=2)
        print()
        return 0
    rows = [("JOB", "ACTION", "SCHEDULE", "TIMEZONE", "NEXT RUN")]
    rows += [(e.job, e.action, e.cron, e.timezone, t.isoformat() if t else "never") for e, t in runs]
    print(format_table(rows))
    return 0


def _print_jobs(ctx: Context) -> int:
    """Every job, configured or declared by container labels, and where each setting came from."""
    from backupd.discovery import describe

    rows = describe(ctx.app.discover(ctx.config))
    if ctx.args.job:
        rows = [r for r in rows if r["job"] == ctx.args.job]
    if ctx.args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    for row in rows:
        containers = f": {', '.join(row['containers'])}" if row["containers"] else ""
        print(f"{row['job']}  (from {row['origin']}{containers})")
        if row["error"]:
            print(f"  error: {row['error']}")
        for note in row["notes"]:
            print(f"  note: {note}")
        cells = [(key, _setting_text(item["value"]), item["from"])
                 for key, value in (row.get("settings") or {}).items()
                 for item in (value if isinstance(value, list) else [value])]
        if cells:
            print("\n".join("  " + line for line in format_table(cells).splitlines()))
    return 0


def _setting_text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def _describe(b: BackupView) -> str:
    lines = [
        f"backup    {b.id}",
        f"job       {b.job}",
        f"status    {b.status}",
        f"started   {b.started_at.isoformat()}",
        f"finished  {b.finished_at.isoformat() if b.finished_at else '-'}",
        f"host      {b.host}",
    ]
    if b.downtime is not None:
        lines.append(f"downtime  {b.downtime:.1f} s (stop_containers held stopped)")
    if b.deleted_at:
        lines.append(f"deleted   {b.deleted_at.isoformat()}")
    if b.error:
        lines.append(f"error     {b.error}")
    if b.suspicion:
        lines.append(f"suspicious {b.suspicion} (backupd accept {b.id} to trust it)")
    lines += [f"warning   {w}" for w in b.warnings]
    for a in b.artifacts:
        enc = f", {a.encryption}" if a.encryption else ""
        files = f", {a.file_count} files" if a.file_count is not None else ""
        lines.append(f"  {a.kind} {a.name} ({a.source}): {a.status}, "
                     f"{human_bytes(a.size or 0)}{files}, {a.compression}{enc}, sha256 {a.sha256 or '-'}")
        if a.excludes:
            lines.append(f"    excludes: {', '.join(a.excludes)}")
        for c in a.copies:
            err = f" ({c.error})" if c.error else ""
            lines.append(f"    {c.destination}: {c.status} {c.key}{err}")
    return "\n".join(lines)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupd", description="Scheduled backups of Docker volumes and databases.")
    parser.add_argument("--config", help="config file (default: $BACKUPD_CONFIG, then /etc/backupd/backupd.yml)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="log format (default: text on a terminal, json otherwise)")
    parser.add_argument("--version", action="version", version=f"backupd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[Context], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("backup", cmd_backup, "run one job now; prints the backup id, exit 0 only if every "
            "artifact reached every destination")
    p.add_argument("job")
    p.add_argument("--no-wait", action="store_true",
                   help="refuse (exit 75) instead of waiting while another backupd runs this job "
                        "or uses its volumes or containers")

    p = add("run", cmd_run, "run as a daemon: back up every job on its schedule until SIGTERM")
    p.add_argument("--http", metavar="[HOST:]PORT",
                   help="serve /healthz and /metrics here (default: $BACKUPD_HTTP, then the config's http)")

    p = add("list", cmd_list, "list backups in the catalog, newest first")
    p.add_argument("--job")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--schedule", action="store_true", help="list scheduled entries and their next run instead")
    p.add_argument("--jobs", action="store_true",
                   help="list jobs instead, configured or declared by container labels, with where each "
                        "setting came from")

    p = add("show", cmd_show, "show one backup with its artifacts and copies")
    p.add_argument("backup_id")
    p.add_argument("--json", action="store_true")

    p = add("restore", cmd_restore, "restore a volume or a database dump from a backup")
    p.add_argument("backup_id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--volume", help="the volume (artifact name) to restore")
    what.add_argument("--database", help="the database dump (its `name:` in the job) to restore")
    p.add_argument("--to-volume", help="restore into this volume instead (created if missing)")
    p.add_argument("--to-container", help="restore the dump into this container instead")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty target (containers using it are stopped meanwhile)")
    p.add_argument("--identity", help="age identity file, for encrypted backups")
    p.add_argument("--no-wait", action="store_true",
                   help="refuse (exit 75) instead of waiting while another backupd uses the target")

    p = add("verify", cmd_verify, "re-read every copy of a backup: size, sha256, decompression, tar")
    p.add_argument("backup_id")
    p.add_argument("--restore", action="store_true",
                   help="also restore each volume into a scratch volume and remove it (a restore drill)")
    p.add_argument("--identity", help="age identity file, to check encrypted contents")

    p = add("prune", cmd_prune, "apply retention: delete backups no rule keeps, from every destination")
    p.add_argument("--job", help="only this job (default: every job with a retention policy)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the decision, delete nothing (with --orphans: list, remove and mark nothing)")
    p.add_argument("--orphans", action="store_true",
                   help="instead, remove the leftovers of interrupted uploads (.partial- files, open "
                        "multipart uploads) that no running backup owns, list objects the catalog does "
                        "not know, and mark copies that vanished as missing")
    p.add_argument("--delete", action="store_true",
                   help="with --orphans: also delete the objects the catalog does not know")
    p.add_argument("--compact", action="store_true",
                   help="repository-mode jobs: then free the space of forgotten snapshots (restic prune, "
                        "leaving up to 10%% unused so that little is repacked)")

    p = add("accept", cmd_accept, "trust a backup the shrinkage guard flagged as suspicious, so that "
            "retention of its job runs again")
    p.add_argument("backup_id")

    catalog_p = sub.add_parser("catalog", help="catalog maintenance")
    catalog_sub = catalog_p.add_subparsers(dest="catalog_command", required=True, metavar="SUBCOMMAND")
    rebuild = catalog_sub.add_parser("rebuild", help="re-create catalog rows from the manifests on a destination")
    rebuild.add_argument("--destination", required=True)
    rebuild.set_defaults(func=cmd_catalog_rebuild)

    config_p = sub.add_parser("config", help="config file commands")
    config_sub = config_p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_sub.add_parser("check", help="validate the config file; non-zero exit on error")
    check.set_defaults(func=cmd_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # What the imports built lives until exit: frozen, no collection walks it again, nor the
    # last one at exit (which took 0.15 s with SQLAlchemy loaded, for every command).
    gc.freeze()
    gc.enable()  # backupd.__main__ turns it off while the imports run
    args = build_parser().parse_args(argv)
    interrupts.install()  # SIGTERM unwinds like Ctrl-C: every finally runs
    setup_logging(args.log_level, args.log_format)
    if getattr(args, "to_volume", None) and not getattr(args, "volume", None):
        print("backupd: error: --to-volume goes with --volume", file=sys.stderr)
        return 2
    if getattr(args, "to_container", None) and not getattr(args, "database", None):
        print("backupd: error: --to-container goes with --database", file=sys.stderr)
        return 2
    ctx = Context(args)
    try:
        return args.func(ctx)
    except BackupdError as exc:
        print(redact(f"backupd: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("backupd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`backupd list | head`): stop quietly, as if killed by SIGPIPE.
        # Output still buffered goes nowhere, so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        interrupts.hold_from_now()
        ctx.close()
