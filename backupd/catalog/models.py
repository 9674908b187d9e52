"""SQLAlchemy models of the catalog: runs, artifacts, copies, held containers, owners, leases."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from backupd.redaction import redact


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite has no time zones), always returned aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class RedactedText(TypeDecorator[str]):
    """Text that may quote a failing command or tool (errors, warnings): masked as it is
    written (backupd.redaction), so no secret reaches the catalog, `show`, or a manifest."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> str | None:
        return None if value is None else redact(value)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "backupd_schema"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class BackupRow(Base):
    __tablename__ = "backups"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # running/succeeded/partial/failed
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(RedactedText, nullable=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    process: Mapped[str] = mapped_column(String(64), default="")  # "pid:start time" (before v4)
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)  # OwnerRow.id (v4)
    warnings: Mapped[str | None] = mapped_column(RedactedText, nullable=True)  # JSON list (v4)
    # Why a succeeded backup looks too small to trust (v5); cleared by `backupd accept`.
    suspicion: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Seconds the run held its stop_containers stopped (v8); None when it stopped none.
    downtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Kept by the catalog as artifacts are added and finished (schema v3), so listing
    # 100k backups reads one index instead of joining and grouping their artifacts.
    total_size: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    artifact_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    artifacts: Mapped[list["ArtifactRow"]] = relationship(
        back_populates="backup", order_by="ArtifactRow.id", cascade="all, delete-orphan"
    )
    __table_args__ = (
        Index("ix_backups_job_started", "job", "started_at"),
        # Covers `list --job`: the rows come out of the index in order, no table lookups.
        Index("ix_backups_list", "job", "started_at", "id", "status", "total_size", "artifact_count",
              "deleted_at", "suspicion"),
    )


class ArtifactRow(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backup_id: Mapped[str] = mapped_column(ForeignKey("backups.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # volume / database
    name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text, default="")
    compression: Mapped[str] = mapped_column(String(16))
    encryption: Mapped[str | None] = mapped_column(String(16), nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # running/succeeded/failed
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # PostgreSQL's INTEGER stops at 2 GiB
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(RedactedText, nullable=True)
    # Volumes (v7): the exclude patterns the archive was made with (a JSON list), and how many
    # members its tar holds (counted by the tar guard as it passed; the shrinkage guard compares it).
    excludes: Mapped[str | None] = mapped_column(Text, nullable=True)
    file_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    backup: Mapped[BackupRow] = relationship(back_populates="artifacts")
    copies: Mapped[list["CopyRow"]] = relationship(
        back_populates="artifact", order_by="CopyRow.id", cascade="all, delete-orphan"
    )


class ArtifactBlocksRow(Base):
    """Per-block SHA-256s of an artifact's stored bytes (schema v2; none for older backups).

    A table of its own so listing backups never loads them.
    """

    __tablename__ = "artifact_blocks"
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    block_size: Mapped[int] = mapped_column(Integer)
    digests: Mapped[bytes] = mapped_column(LargeBinary)  # 32 bytes per block, in order


class CopyRow(Base):
    __tablename__ = "copies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending/stored/failed/deleted/missing
    error: Mapped[str | None] = mapped_column(RedactedText, nullable=True)
    # Repository mode (v6): the copy is a restic snapshot in the repository at `key`.
    snapshot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes_added: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # new data it stored
    bytes_covered: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # what it holds
    artifact: Mapped[ArtifactRow] = relationship(back_populates="copies")
    # Metrics count stored copies per destination from this index alone (v4).
    __table_args__ = (Index("ix_copies_status_destination", "status", "destination"),)


class HeldContainerRow(Base):
    """A container backupd stopped; written before stopping, cleared after starting."""

    __tablename__ = "held_containers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backup_id: Mapped[str] = mapped_column(String(64), index=True)
    container_id: Mapped[str] = mapped_column(String(128))
    container_name: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255), default="")
    process: Mapped[str] = mapped_column(String(64), default="")  # before v4
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)  # OwnerRow.id (v4)
    engine_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # where it lives (v4)
    stopped_at: Mapped[datetime] = mapped_column(UTCDateTime)
    restarted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OwnerRow(Base):
    """A backupd process that holds leases, runs backups or stopped containers (schema v4).

    How another process tells whether it is still alive, without trusting the hostname
    (Compose gives a recreated container a new one): the same pid namespace proves it
    through /proc; the same engine proves it through the owner's container; otherwise a
    heartbeat older than the lease TTL means it is gone.
    """

    __tablename__ = "owners"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")  # for humans only
    pid_ns: Mapped[str] = mapped_column(String(64), default="")
    pid: Mapped[int] = mapped_column(Integer)
    pid_start: Mapped[str] = mapped_column(String(32), default="")
    engine_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    container_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    container_started: Mapped[str | None] = mapped_column(String(64), nullable=True)
    command: Mapped[str] = mapped_column(String(64), default="")  # "run", "backup", ...
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LeaseRow(Base):
    """One resource (job, volume, container) held by one run of one owner (schema v4).

    The primary key makes taking a lease atomic on every database: the second insert fails.
    """

    __tablename__ = "leases"
    resource: Mapped[str] = mapped_column(String(512), primary_key=True)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    holder: Mapped[str] = mapped_column(String(32))  # the run within the owner
    purpose: Mapped[str] = mapped_column(Text, default="")
    since: Mapped[datetime] = mapped_column(UTCDateTime)
