"""The catalog: the record of every backup, artifact and copy.

The catalog is the truth retention and restore work from, so it only ever
says what happened: a copy is `stored` after its destination committed it,
an artifact `succeeded` after every byte was hashed, a backup `succeeded`
only when every artifact reached every destination. Each write is its own
short transaction so a crash leaves the last true state behind.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from sqlalchemy import Connection, case, create_engine, event, func, insert, inspect, select, text, update
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from backupd.catalog.models import (
    ArtifactBlocksRow,
    ArtifactRow,
    BackupRow,
    Base,
    CopyRow,
    HeldContainerRow,
    LeaseRow,
    OwnerRow,
    SchemaVersion,
)
from backupd.errors import BackupdError, ConfigError, NotFoundError
from backupd.identity import process_alive, process_token
from backupd.private import create_private_file, make_dirs

log = logging.getLogger(__name__)

from backupd.status import (  # noqa: E402 - re-exported: callers import statuses from the catalog
    COPY_FAILED, DELETED, FAILED, MISSING, PARTIAL, PENDING, RUNNING, STORED, SUCCEEDED, SUSPICIOUS,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_backup_id(now: datetime) -> str:
    """Sortable by time, unique without coordination, short enough to type."""
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


BACKUP_ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")  # what new_backup_id makes (fullmatch)


@dataclass(frozen=True)
class CopyView:
    destination: str
    key: str  # the object; in repository mode, the repository's path within the destination
    status: str
    error: str | None
    snapshot_id: str | None = None  # repository mode: the restic snapshot
    bytes_added: int | None = None
    bytes_covered: int | None = None


@dataclass(frozen=True)
class ArtifactView:
    id: int
    kind: str
    name: str
    source: str
    compression: str
    encryption: str | None
    status: str
    size: int | None
    sha256: str | None
    error: str | None
    copies: tuple[CopyView, ...]
    excludes: tuple[str, ...] = ()  # volumes: the patterns left out of the archive
    file_count: int | None = None  # volumes: members of the archive (None: a dump, or not counted)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["destinations"] = data.pop("copies")
        data["excludes"] = list(self.excludes)
        del data["id"]
        return data


class BackupSummary(NamedTuple):
    """One backup without its artifacts: what tables and retention need, cheap at 100k rows.

    A named tuple, and started as stored text: a frozen dataclass and a datetime
    per row each cost more than the query at 100k rows.
    """

    id: str
    job: str
    status: str
    started: str  # naive UTC, ISO 'YYYY-MM-DD HH:MM:SS[.ffffff]'
    size: int
    artifacts: int

    @property
    def started_at(self) -> datetime:
        return datetime.fromisoformat(self.started + "+00:00")  # faster than .replace(tzinfo=)


@dataclass(frozen=True)
class BackupView:
    id: str
    job: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    deleted_at: datetime | None
    error: str | None
    host: str
    artifacts: tuple[ArtifactView, ...]
    warnings: tuple[str, ...] = ()
    suspicion: str | None = None
    downtime: float | None = None  # seconds its stop_containers were held stopped

    @property
    def size(self) -> int:
        return sum(a.size or 0 for a in self.artifacts)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job": self.job,
            "status": self.status,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "deleted_at": _iso(self.deleted_at),
            "error": self.error,
            "host": self.host,
            "warnings": list(self.warnings),
            "suspicion": self.suspicion,
            "downtime_seconds": self.downtime,
            "size": self.size,
            "artifacts": [a.to_json() for a in self.artifacts],
        }

    def artifact(self, kind: str, name: str) -> ArtifactView:
        for art in self.artifacts:
            if art.kind == kind and art.name == name:
                return art
        have = ", ".join(f"{a.kind} {a.name}" for a in self.artifacts) or "none"
        raise NotFoundError(f"backup {self.id} has no {kind} '{name}' (it has: {have})")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _view(row: BackupRow) -> BackupView:
    return BackupView(
        id=row.id,
        job=row.job,
        status=row.status,
        started_at=row.started_at,
        finished_at=row.finished_at,
        deleted_at=row.deleted_at,
        error=row.error,
        host=row.host,
        warnings=tuple(json.loads(row.warnings)) if row.warnings else (),
        suspicion=row.suspicion,
        downtime=row.downtime,
        artifacts=tuple(
            ArtifactView(
                id=a.id,
                kind=a.kind,
                name=a.name,
                source=a.source,
                compression=a.compression,
                encryption=a.encryption,
                status=a.status,
                size=a.size,
                sha256=a.sha256,
                error=a.error,
                copies=tuple(CopyView(c.destination, c.key, c.status, c.error, c.snapshot_id, c.bytes_added,
                                      c.bytes_covered) for c in a.copies),
                excludes=tuple(json.loads(a.excludes)) if a.excludes else (),
                file_count=a.file_count,
            )
            for a in row.artifacts
        ),
    )


# Schema migrations: append a function per new version; never edit old ones. Each runs on
# the one connection that holds the migration lock (see Catalog.migrate).
def _v1(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _v2(conn: Connection) -> None:
    """artifact_blocks: per-block checksums, so restore reads a copy once."""
    ArtifactBlocksRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _add_missing_columns(conn: Connection, table: str, columns: Iterable[Any], default: str | None) -> None:
    """ALTER TABLE ADD COLUMN for each model column the table lacks (a catalog created by this
    release has them already: v1 creates the tables from the current models)."""
    have = {c["name"] for c in inspect(conn).get_columns(table)}
    for column in columns:
        if column.name not in have:
            kind = column.type.compile(conn.dialect)
            tail = f" NOT NULL DEFAULT {default}" if default is not None else ""
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column.name} {kind}{tail}"))


def _v3(conn: Connection) -> None:
    """backups.total_size and artifact_count (filled in from the artifacts) with an index
    that covers listing; artifact sizes as 64-bit integers on PostgreSQL."""
    _add_missing_columns(conn, "backups", (BackupRow.total_size, BackupRow.artifact_count), "0")
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE artifacts ALTER COLUMN size TYPE BIGINT"))
    of_backup = ArtifactRow.backup_id == BackupRow.id
    conn.execute(update(BackupRow).values(
        total_size=select(func.coalesce(func.sum(ArtifactRow.size), 0)).where(of_backup).scalar_subquery(),
        artifact_count=select(func.count(ArtifactRow.id)).where(of_backup).scalar_subquery(),
    ))
    for index in BackupRow.__table__.indexes:  # type: ignore[attr-defined]
        index.create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    """owners and leases (exclusion between processes and hosts); the owner of each run and
    held container instead of the hostname; run warnings; stored copies per destination
    counted from an index."""
    for table in (OwnerRow.__table__, LeaseRow.__table__):  # type: ignore[attr-defined]
        table.create(conn, checkfirst=True)
    _add_missing_columns(conn, "backups", (BackupRow.owner, BackupRow.warnings), None)
    _add_missing_columns(conn, "held_containers", (HeldContainerRow.owner, HeldContainerRow.engine_id), None)
    for index in CopyRow.__table__.indexes:  # type: ignore[attr-defined]
        index.create(conn, checkfirst=True)


def _v5(conn: Connection) -> None:
    """backups.suspicion (the shrinkage guard), in the index that covers listing."""
    _add_missing_columns(conn, "backups", (BackupRow.suspicion,), None)
    index = next(i for i in BackupRow.__table__.indexes if i.name == "ix_backups_list")  # type: ignore[attr-defined]
    index.drop(conn, checkfirst=True)
    index.create(conn)


def _v6(conn: Connection) -> None:
    """Repository mode: each copy may be a restic snapshot, with the bytes it added and covered."""
    _add_missing_columns(conn, "copies", (CopyRow.snapshot_id, CopyRow.bytes_added, CopyRow.bytes_covered), None)


def _v7(conn: Connection) -> None:
    """Volume archives record their exclude patterns and member count (the shrinkage guard
    compares file counts too)."""
    _add_missing_columns(conn, "artifacts", (ArtifactRow.excludes, ArtifactRow.file_count), None)


def _v8(conn: Connection) -> None:
    """backups.downtime: how long each run held its stop_containers stopped."""
    _add_missing_columns(conn, "backups", (BackupRow.downtime,), None)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8]
MIGRATION_LOCK = 0x6261636B757064  # "backupd": PostgreSQL advisory lock key


def _redact_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable catalog URL>"


class Catalog:
    """All catalog reads and writes; callers get frozen views, never ORM rows."""

    def __init__(self, url: str) -> None:
        self.url_for_humans = _redact_url(url)
        try:
            if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
                path = url.removeprefix("sqlite:///")
                if path:  # created private: run errors and names are nobody else's to read
                    make_dirs(Path(path).parent)
                    create_private_file(Path(path))
            self.engine = create_engine(url, future=True)
        except (ArgumentError, ImportError, OSError) as exc:
            raise ConfigError(f"catalog: cannot use '{self.url_for_humans}': {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.session_factory = self._session  # for the catalog's own helpers (leases)
        try:
            self.migrate()
        except OperationalError as exc:
            raise BackupdError(
                f"catalog {self.url_for_humans} is not reachable: {exc.orig}"
            ) from None

    def schema_version(self, conn: Connection) -> int:
        if not inspect(conn).has_table(SchemaVersion.__tablename__):
            return 0
        return conn.scalar(select(func.max(SchemaVersion.version))) or 0

    def migrate(self) -> None:
        """Bring the schema to the newest version; safe to run on every start, by many at once.

        Migrations run under one lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory
        transaction lock), and the version is read again once it is held: of two processes
        starting on a new catalog, one migrates and the other finds it done and carries on.
        """
        with self.engine.connect() as conn:
            current = self.schema_version(conn)
            conn.rollback()
        if current == len(MIGRATIONS):
            return
        if current > len(MIGRATIONS):
            raise BackupdError(
                f"catalog schema version {current} is newer than this backupd understands "
                f"({len(MIGRATIONS)}); upgrade backupd"
            )
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            current = self.schema_version(conn)
            if current > len(MIGRATIONS):
                raise BackupdError(f"catalog schema version {current} is newer than this backupd "
                                   f"understands ({len(MIGRATIONS)}); upgrade backupd")
            for version in range(current + 1, len(MIGRATIONS) + 1):
                MIGRATIONS[version - 1](conn)
                conn.execute(insert(SchemaVersion).values(version=version))
                log.info("catalog schema migrated to version %d", version)
            conn.commit()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ writes

    def start_backup(self, job: str, now: datetime | None = None, owner: str | None = None) -> str:
        now = now or utcnow()
        backup_id = new_backup_id(now)
        with self._session.begin() as s:
            s.add(BackupRow(id=backup_id, job=job, status=RUNNING, started_at=now,
                            host=socket.gethostname(), process=process_token(), owner=owner))
        return backup_id

    def record_failed_run(self, job: str, error: str, now: datetime | None = None,
                          owner: str | None = None) -> str:
        """A run that failed before it could start (planning: unknown volume, engine down):
        recorded failed with its cause, so `list` and /healthz show it."""
        now = now or utcnow()
        backup_id = new_backup_id(now)
        with self._session.begin() as s:
            s.add(BackupRow(id=backup_id, job=job, status=FAILED, started_at=now, finished_at=utcnow(),
                            error=error, host=socket.gethostname(), process=process_token(), owner=owner))
        return backup_id

    def set_downtime(self, backup_id: str, seconds: float) -> None:
        """How long the run held its stop_containers stopped (first stop asked to last start done)."""
        with self._session.begin() as s:
            s.get_one(BackupRow, backup_id).downtime = seconds

    def add_warnings(self, backup_id: str, warnings: list[str]) -> None:
        """Problems that did not fail the run (`on_error: continue` hooks): kept on the run."""
        if not warnings:
            return
        with self._session.begin() as s:
            row = s.get_one(BackupRow, backup_id)
            row.warnings = json.dumps(json.loads(row.warnings or "[]") + list(warnings))

    def add_artifact(
        self,
        backup_id: str,
        kind: str,
        name: str,
        source: str,
        compression: str,
        encryption: str | None,
        keys: dict[str, str],
        excludes: Iterable[str] = (),
    ) -> int:
        """Record an artifact about to be written, with a pending copy per destination."""
        excludes = list(excludes)
        with self._session.begin() as s:
            art = ArtifactRow(backup_id=backup_id, kind=kind, name=name, source=source,
                              compression=compression, encryption=encryption, status=RUNNING,
                              excludes=json.dumps(excludes) if excludes else None)
            art.copies = [CopyRow(destination=d, key=k, status=PENDING) for d, k in keys.items()]
            s.add(art)
            s.execute(update(BackupRow).where(BackupRow.id == backup_id)
                      .values(artifact_count=BackupRow.artifact_count + 1))
            s.flush()
            return art.id

    def finish_artifact(
        self, artifact_id: int, size: int, sha256: str, copy_errors: dict[str, str],
        blocks: tuple[int, bytes] | None = None, file_count: int | None = None,
    ) -> str:
        """Record the stored size/hash (and block size and digests, and a volume's member
        count); copies without an error are stored."""
        with self._session.begin() as s:
            art = s.get_one(ArtifactRow, artifact_id)
            if art.size is not None:
                raise BackupdError(f"artifact {artifact_id} of backup {art.backup_id} is already finished")
            art.size, art.sha256, art.file_count = size, sha256, file_count
            s.execute(update(BackupRow).where(BackupRow.id == art.backup_id)
                      .values(total_size=BackupRow.total_size + size))
            if blocks is not None:
                s.add(ArtifactBlocksRow(artifact_id=artifact_id, block_size=blocks[0], digests=blocks[1]))
            for copy in art.copies:
                if copy.destination in copy_errors:
                    copy.status, copy.error = COPY_FAILED, copy_errors[copy.destination]
                else:
                    copy.status = STORED
            stored = [c for c in art.copies if c.status == STORED]
            art.status = SUCCEEDED if len(stored) == len(art.copies) else (PARTIAL if stored else FAILED)
            if copy_errors:
                art.error = "; ".join(f"{d}: {e}" for d, e in copy_errors.items())
            return art.status

    def finish_snapshots(self, artifact_id: int, snapshots: dict[str, tuple[str, int | None, int]],
                         copy_errors: dict[str, str]) -> str:
        """Repository mode: record each destination's snapshot (id, bytes added, bytes covered)
        or its error. The artifact's size is the bytes its first snapshot holds (what the
        shrinkage guard compares: an unchanged volume adds almost nothing, yet is whole)."""
        with self._session.begin() as s:
            art = s.get_one(ArtifactRow, artifact_id)
            for copy in art.copies:
                if copy.destination in snapshots:
                    copy.snapshot_id, copy.bytes_added, copy.bytes_covered = snapshots[copy.destination]
                    copy.status = STORED
                else:
                    copy.status = COPY_FAILED
                    copy.error = copy_errors.get(copy.destination, "no snapshot was made")
            stored = [c for c in art.copies if c.status == STORED]
            art.size = stored[0].bytes_covered if stored else 0
            s.execute(update(BackupRow).where(BackupRow.id == art.backup_id)
                      .values(total_size=BackupRow.total_size + art.size))
            art.status = SUCCEEDED if len(stored) == len(art.copies) else (PARTIAL if stored else FAILED)
            errors = {c.destination: c.error for c in art.copies if c.status == COPY_FAILED}
            if errors:
                art.error = "; ".join(f"{d}: {e}" for d, e in errors.items())
            return art.status

    def fail_artifact(self, artifact_id: int, error: str) -> None:
        with self._session.begin() as s:
            art = s.get_one(ArtifactRow, artifact_id)
            art.status, art.error = FAILED, error
            for copy in art.copies:
                if copy.status == PENDING:
                    copy.status, copy.error = COPY_FAILED, error

    def finish_backup(self, backup_id: str, error: str | None = None) -> str:
        """Derive the run's status from its artifacts: the catalog never guesses."""
        with self._session.begin() as s:
            row = s.get_one(BackupRow, backup_id)
            statuses = [a.status for a in row.artifacts]
            if error is None and statuses and all(st == SUCCEEDED for st in statuses):
                row.status = SUCCEEDED
            elif any(st in (SUCCEEDED, PARTIAL) for st in statuses):
                row.status = PARTIAL
            else:
                row.status = FAILED
            errors = [e for e in [error] + [f"{a.kind} {a.name}: {a.error}" for a in row.artifacts if a.error] if e]
            row.error = "; ".join(errors) or None
            row.finished_at = utcnow()
            return row.status

    def set_copy_status(self, backup_id: str, destination: str, key: str, status: str,
                        error: str | None = None) -> None:
        self._set_copy(backup_id, destination, CopyRow.key == key, status, error)

    def set_snapshot_status(self, backup_id: str, destination: str, snapshot_id: str, status: str,
                            error: str | None = None) -> None:
        """Repository mode: the copy that is this snapshot (one repository holds every volume
        of a run, so the key alone does not name it)."""
        self._set_copy(backup_id, destination, CopyRow.snapshot_id == snapshot_id, status, error)

    def _set_copy(self, backup_id: str, destination: str, which: Any, status: str, error: str | None) -> None:
        """Set the status of the one copy of a backup on a destination that `which` selects."""
        with self._session.begin() as s:
            copy = s.scalars(
                select(CopyRow).join(ArtifactRow)
                .where(ArtifactRow.backup_id == backup_id, CopyRow.destination == destination, which)
            ).one()
            copy.status, copy.error = status, error

    def mark_deleted(self, backup_id: str) -> None:
        with self._session.begin() as s:
            s.get_one(BackupRow, backup_id).deleted_at = utcnow()

    def fail_interrupted(self, owner_alive: Callable[[str | None], bool]) -> list[str]:
        """Runs left 'running' by a dead backupd are failed, truthfully.

        Rows from before schema v4 carry no owner: judged by hostname and pid as they were.
        """
        host = socket.gethostname()
        failed = []
        with self._session.begin() as s:
            rows = s.scalars(select(BackupRow).where(BackupRow.status == RUNNING))
            for row in rows:
                if row.owner is None:
                    if row.host != host or process_alive(row.process):
                        continue
                elif owner_alive(row.owner):
                    continue
                for art in row.artifacts:
                    if art.status == RUNNING:
                        art.status, art.error = FAILED, "interrupted"
                    for copy in art.copies:
                        if copy.status == PENDING:
                            copy.status, copy.error = COPY_FAILED, "interrupted"
                row.status, row.error, row.finished_at = FAILED, "interrupted: backupd stopped mid-run", utcnow()
                failed.append(row.id)
        return failed

    def running(self) -> list[tuple[str, str | None, datetime]]:
        """(id, owner, started) of every backup still recorded running."""
        with self._session() as s:
            return [(i, o, t) for i, o, t in s.execute(
                select(BackupRow.id, BackupRow.owner, BackupRow.started_at).where(BackupRow.status == RUNNING))]

    def known(self, backup_ids: Iterable[str]) -> set[str]:
        """Which of these backups the catalog has a row for (deleted ones included)."""
        ids, found = sorted(set(backup_ids)), set()
        with self._session() as s:
            for start in range(0, len(ids), 500):  # bound the IN list
                found.update(s.scalars(select(BackupRow.id).where(BackupRow.id.in_(ids[start:start + 500]))))
        return found

    def refers_to_owner(self, owner_id: str) -> bool:
        """Does a running backup or an unreleased held container still name this owner?"""
        with self._session() as s:
            running = s.scalar(select(func.count()).select_from(BackupRow).where(
                BackupRow.owner == owner_id, BackupRow.status == RUNNING))
            holding = s.scalar(select(func.count()).select_from(HeldContainerRow).where(
                HeldContainerRow.owner == owner_id, HeldContainerRow.restarted_at.is_(None)))
        return bool(running or holding)

    def import_backup(self, data: dict[str, Any], blocks: Iterable[tuple[int, bytes] | None] = ()) -> bool:
        """Insert a backup from its JSON form (a manifest), with each artifact's (block size,
        block digests) in `blocks`, in order, where known; False if the id is already known."""
        with self._session.begin() as s:
            if s.get(BackupRow, data["id"]) is not None:
                return False
            artifacts = data.get("artifacts", [])
            row = BackupRow(id=data["id"], job=data["job"], status=data["status"],
                            started_at=_parse_time(data["started_at"]),
                            finished_at=_parse_time(data.get("finished_at")),
                            error=data.get("error"), host=data.get("host") or "", process="",
                            warnings=json.dumps(data["warnings"]) if data.get("warnings") else None,
                            total_size=sum(a.get("size") or 0 for a in artifacts),
                            artifact_count=len(artifacts))
            for art in artifacts:
                row.artifacts.append(ArtifactRow(
                    kind=art["kind"], name=art["name"], source=art.get("source", ""),
                    compression=art["compression"], encryption=art.get("encryption"),
                    status=art["status"], size=art.get("size"), sha256=art.get("sha256"),
                    error=art.get("error"), file_count=art.get("file_count"),
                    excludes=json.dumps(art["excludes"]) if art.get("excludes") else None,
                    copies=[CopyRow(destination=c["destination"], key=c["key"], status=c["status"],
                                    error=c.get("error"), snapshot_id=c.get("snapshot_id"),
                                    bytes_added=c.get("bytes_added"), bytes_covered=c.get("bytes_covered"))
                            for c in art.get("destinations", [])]))
            s.add(row)
            s.flush()
            for art_row, known in zip(row.artifacts, blocks):
                if known is not None:
                    s.add(ArtifactBlocksRow(artifact_id=art_row.id, block_size=known[0], digests=known[1]))
            return True

    def add_copies(self, backup_id: str,
                   copies: Iterable[tuple[str, str, str, str, str, str | None, str | None]]) -> int:
        """Record more copies of a known backup's artifacts: (kind, name, destination, key,
        status, error, snapshot id or None) each. Copies already recorded (same destination
        and key) are left as they are. Returns how many were added."""
        added = 0
        with self._session.begin() as s:
            artifacts = {(a.kind, a.name): a for a in s.scalars(
                select(ArtifactRow).where(ArtifactRow.backup_id == backup_id)
                .options(selectinload(ArtifactRow.copies)))}
            for kind, name, destination, key, status, error, snapshot_id in copies:
                art = artifacts[(kind, name)]
                if any((c.destination, c.key) == (destination, key) for c in art.copies):
                    continue
                art.copies.append(CopyRow(destination=destination, key=key, status=status, error=error,
                                          snapshot_id=snapshot_id))
                added += 1
        return added

    # ------------------------------------------------------------ held containers

    def hold_container(self, backup_id: str, container_id: str, name: str, owner: str | None = None,
                       engine_id: str | None = None) -> int:
        with self._session.begin() as s:
            row = HeldContainerRow(backup_id=backup_id, container_id=container_id, container_name=name,
                                   host=socket.gethostname(), process=process_token(), owner=owner,
                                   engine_id=engine_id, stopped_at=utcnow())
            s.add(row)
            s.flush()
            return row.id

    def release_container(self, hold_id: int) -> None:
        with self._session.begin() as s:
            s.get_one(HeldContainerRow, hold_id).restarted_at = utcnow()

    def held_containers(self, owner_alive: Callable[[str | None], bool],
                        engine_id: str | None) -> list[tuple[int, str, str]]:
        """(hold id, container id, name) of containers a dead backupd left stopped on this engine.

        Holds of live owners (a backup running right now) are not returned. Rows from before
        schema v4 carry no owner or engine: judged by hostname and pid as they were.
        """
        host = socket.gethostname()
        with self._session() as s:
            rows = list(s.scalars(select(HeldContainerRow).where(HeldContainerRow.restarted_at.is_(None))))
        found = []
        for r in rows:
            if r.owner is None:
                dead = r.host == host and not process_alive(r.process)
            else:
                dead = r.engine_id == engine_id and not owner_alive(r.owner)
            if dead:
                found.append((r.id, r.container_id, r.container_name))
        return found

    # ------------------------------------------------------------ reads

    def get(self, backup_id: str) -> BackupView:
        with self._session() as s:
            row = s.scalars(
                select(BackupRow).where(BackupRow.id == backup_id)
                .options(selectinload(BackupRow.artifacts).selectinload(ArtifactRow.copies))
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"backup '{backup_id}' is not in the catalog {self.url_for_humans}")
            return _view(row)

    def blocks(self, artifact_id: int) -> tuple[int, bytes] | None:
        """(block size, concatenated SHA-256s) of an artifact, if it was stored with them."""
        with self.engine.connect() as conn:
            row = conn.execute(select(ArtifactBlocksRow.block_size, ArtifactBlocksRow.digests)
                               .where(ArtifactBlocksRow.artifact_id == artifact_id)).one_or_none()
        return None if row is None else (row[0], bytes(row[1]))

    def list(self, job: str | None = None, include_deleted: bool = False,
             statuses: Iterable[str] | None = None) -> list[BackupView]:
        """Backups newest first."""
        query = select(BackupRow).options(
            selectinload(BackupRow.artifacts).selectinload(ArtifactRow.copies)
        ).order_by(BackupRow.started_at.desc(), BackupRow.id.desc())
        if job is not None:
            query = query.where(BackupRow.job == job)
        if not include_deleted:
            query = query.where(BackupRow.deleted_at.is_(None))
        if statuses is not None:
            query = query.where(BackupRow.status.in_(list(statuses)))
        with self._session() as s:
            return [_view(r) for r in s.scalars(query)]

    def summaries(self, job: str | None = None, batch: int = 5000) -> Iterator[BackupSummary]:
        """Backups (not deleted) newest first, with artifact count and total size, from one index.

        Streamed `batch` rows at a time: 100k summaries never sit in memory at once.
        """
        from sqlalchemy import String, type_coerce

        query = (
            # started_at raw: SQLAlchemy's per-row datetime processing costs more than the query.
            select(BackupRow.id, BackupRow.job, _shown_status(), type_coerce(BackupRow.started_at, String),
                   BackupRow.total_size, BackupRow.artifact_count)
            .where(*_listed(job))
            .order_by(BackupRow.started_at.desc(), BackupRow.id.desc())
        )
        # plain rows: no ORM identity map for 100k backups
        with self.engine.connect().execution_options(yield_per=batch) as conn:
            for rows in conn.execute(query).partitions():
                if not isinstance(rows[0][3], str):  # SQLite gives text, other databases datetimes
                    yield from (BackupSummary(i, j, st, _stored_text(t), size, n) for i, j, st, t, size, n in rows)
                else:
                    yield from map(BackupSummary._make, rows)

    def longest(self, job: str | None = None) -> tuple[int, int, int]:
        """Lengths of the longest id, job and status summaries(job) yields: the widths of a
        table that is printed as the rows stream by."""
        query = select(func.max(func.length(BackupRow.id)), func.max(func.length(BackupRow.job)),
                       func.max(func.length(_shown_status()))).where(*_listed(job))
        with self.engine.connect() as conn:
            row = conn.execute(query).one()
        return (row[0] or 0, row[1] or 0, row[2] or 0)

    def last_runs(self, job: str) -> tuple[BackupSummary | None, datetime | None]:
        """(the job's newest finished run, when its newest success finished): two index lookups,
        the same cost at 100k backups as at ten (for /healthz)."""
        newest = (select(BackupRow.id, BackupRow.job, _shown_status(), BackupRow.started_at,
                         BackupRow.total_size, BackupRow.artifact_count, BackupRow.finished_at)
                  .where(*_listed(job)).order_by(BackupRow.started_at.desc(), BackupRow.id.desc()).limit(1))
        with self._session() as s:
            last = s.execute(newest.where(BackupRow.status != RUNNING)).one_or_none()
            ok = s.execute(newest.where(BackupRow.status == SUCCEEDED)).one_or_none()
        summary = None if last is None else BackupSummary(last[0], last[1], last[2], _stored_text(last[3]),
                                                          last[4], last[5])
        return summary, (None if ok is None else ok[6])

    def recent_sizes(self, job: str, before: datetime, count: int) -> list[int]:
        """Sizes of the job's `count` newest trusted successes started before `before` (newest
        first): what the shrinkage guard compares a new backup with."""
        query = (select(BackupRow.total_size)
                 .where(*_listed(job), BackupRow.status == SUCCEEDED, BackupRow.suspicion.is_(None),
                        BackupRow.started_at < before)
                 .order_by(BackupRow.started_at.desc()).limit(count))
        with self.engine.connect() as conn:
            return [size for (size,) in conn.execute(query)]

    def recent_file_counts(self, job: str, before: datetime, count: int) -> list[int]:
        """Members of the volume archives of the job's `count` newest trusted successes started
        before `before` that counted them (newest first): the shrinkage guard's other yardstick."""
        recent = (select(BackupRow.id, BackupRow.started_at)
                  .where(*_listed(job), BackupRow.status == SUCCEEDED, BackupRow.suspicion.is_(None),
                         BackupRow.started_at < before,
                         select(ArtifactRow.id).where(ArtifactRow.backup_id == BackupRow.id,
                                                      ArtifactRow.file_count.is_not(None)).exists())
                  .order_by(BackupRow.started_at.desc()).limit(count).subquery())
        query = (select(func.sum(ArtifactRow.file_count))
                 .join(recent, recent.c.id == ArtifactRow.backup_id)
                 .group_by(recent.c.id, recent.c.started_at).order_by(recent.c.started_at.desc()))
        with self.engine.connect() as conn:
            return [int(n) for (n,) in conn.execute(query)]

    def set_suspicion(self, backup_id: str, reason: str | None) -> None:
        """Flag a backup as suspicious (with why), or clear the flag (`backupd accept`)."""
        with self._session.begin() as s:
            s.get_one(BackupRow, backup_id).suspicion = reason

    def finished_at(self, backup_id: str) -> datetime | None:
        with self._session() as s:
            return s.scalar(select(BackupRow.finished_at).where(BackupRow.id == backup_id))

    def stored_copies(self) -> dict[str, int]:
        """Stored copies per destination, counted from one index (for /metrics)."""
        query = (select(CopyRow.destination, func.count()).where(CopyRow.status == STORED)
                 .group_by(CopyRow.destination))
        with self.engine.connect() as conn:
            return {dest: count for dest, count in conn.execute(query)}

    def session(self) -> Session:
        """For modules (retention, rebuild) that need a query of their own."""
        return self._session()


def _shown_status() -> Any:
    """A backup's status as tables and retention see it: a succeeded backup the shrinkage guard
    flagged counts as `suspicious` (kept like a failed one, never as a good one) until accepted."""
    return case((BackupRow.suspicion.is_not(None), SUSPICIOUS), else_=BackupRow.status)


def _listed(job: str | None) -> list[Any]:
    """The backups `list` shows: not deleted, of one job if given."""
    conditions = [BackupRow.deleted_at.is_(None)]
    if job is not None:
        conditions.append(BackupRow.job == job)
    return conditions


def _stored_text(value: datetime) -> str:
    """A naive-UTC datetime column value as the text SQLite stores for it."""
    return value.replace(tzinfo=None).isoformat(" ")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # first: switching to WAL itself may wait for a racer
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


__all__ = [
    "Catalog", "BackupSummary", "BackupView", "ArtifactView", "CopyView", "SQLAlchemyError",
    "RUNNING", "SUCCEEDED", "PARTIAL", "FAILED", "SUSPICIOUS",
    "PENDING", "STORED", "COPY_FAILED", "DELETED", "MISSING", "utcnow",
]
