"""The SQL catalog shared by the API and the workers: tables, engine, sessions, migrations.

Large things (weights, archives, component masks, assembled models) are artifacts
in `app.storage`; the catalog keeps their sha256 and the summaries the API shows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")
# The largest id an id column holds (INTEGER: 32-bit on PostgreSQL); the API refuses
# larger ones with a 422 instead of letting the database driver overflow.
MAX_ID = 2**31 - 1
ACTIVE_STATES = ("queued", "running")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


# Ids are never reused: SQLite's AUTOINCREMENT (otherwise it hands out max(id) + 1, so
# the id of a deleted last row comes back); PostgreSQL's sequences never go back.
NO_REUSE = {"sqlite_autoincrement": True}


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = NO_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Model(Base):
    """One version of a registered model: registering a name again adds version n + 1."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("owner", "name", "version", name="uq_models_version"),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer, default=1)
    arch: Mapped[str] = mapped_column(String(64))
    class_names: Mapped[list[Any]] = mapped_column(JSON)
    input_spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    weights_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    component_sets: Mapped[list[ComponentSet]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ComponentSet.id",
    )


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = NO_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    classes: Mapped[dict[str, Any]] = mapped_column(JSON)  # class name -> image count
    archive_sha256: Mapped[str] = mapped_column(String(64), index=True)
    archive_bytes: Mapped[int] = mapped_column(BigInteger)
    archive_suffix: Mapped[str] = mapped_column(String(16))  # ".tar", ".tar.gz" or ".zip"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ComponentSet(Base):
    """The located components of one model on one dataset with one set of parameters."""

    __tablename__ = "component_sets"
    __table_args__ = (UniqueConstraint("model_id", "dataset_id", "params_key"), NO_REUSE)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_key: Mapped[str] = mapped_column(String(400))
    artifact_sha256: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="component_sets")
    components: Mapped[list[Component]] = relationship(
        back_populates="component_set",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Component.class_index",
    )


class Component(Base):
    """Summary row of one class's component (the masks are in the set's artifact)."""

    __tablename__ = "components"
    __table_args__ = NO_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    component_set_id: Mapped[int] = mapped_column(
        ForeignKey("component_sets.id", ondelete="CASCADE"), index=True
    )
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(200))
    params: Mapped[int] = mapped_column(BigInteger)
    flops: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(Integer, default=0)  # samples it was located from
    layers: Mapped[dict[str, Any]] = mapped_column(JSON)  # layer -> [kept, total]

    component_set: Mapped[ComponentSet] = relationship(back_populates="components")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = NO_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    run_after: Mapped[datetime | None] = mapped_column(default=None)
    # Set by a cancel request: a queued job ends at once, a running one at its next
    # progress point (worker.runtime).
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)


class Assembly(Base):
    """One version of an assembled model: creating a name again adds version n + 1."""

    __tablename__ = "assemblies"
    __table_args__ = (
        UniqueConstraint("owner", "name", "version", name="uq_assemblies_version"),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer, default=1)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    eval_dataset_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    classes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    input_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job | None] = relationship()
    sources: Mapped[list[AssemblySource]] = relationship(
        back_populates="assembly",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AssemblySource.position",
    )


class AssemblySource(Base):
    """Lineage: which classes of which model (and which components) an assembly uses.

    The model's name, version, weights hash and arch are copied here when the
    assembly is created, so the lineage names the exact weights on its own."""

    __tablename__ = "assembly_sources"
    __table_args__ = NO_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assembly_id: Mapped[int] = mapped_column(
        ForeignKey("assemblies.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    component_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("component_sets.id", ondelete="RESTRICT"), default=None
    )
    class_indices: Mapped[list[Any]] = mapped_column(JSON)
    class_names: Mapped[list[Any]] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(200), default=None)
    model_version: Mapped[int | None] = mapped_column(Integer, default=None)
    model_arch: Mapped[str | None] = mapped_column(String(64), default=None)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), default=None)

    assembly: Mapped[Assembly] = relationship(back_populates="sources")


class RegisteredName(Base):
    """A name's version counter (kind "model" or "assembly"): versions are numbered from
    it, so a deleted version's number is never given to another one."""

    __tablename__ = "registered_names"
    __table_args__ = (
        UniqueConstraint("owner", "kind", "name", name="uq_registered_names_name"),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Base):
    """A movable name for one version (MLflow's `name@alias`): kind is "model" or
    "assembly", target_id the version's row id."""

    __tablename__ = "aliases"
    __table_args__ = (
        UniqueConstraint("owner", "kind", "name", "alias", name="uq_aliases_alias"),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    alias: Mapped[str] = mapped_column(String(100))
    target_id: Mapped[int] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """An `Idempotency-Key` a creating POST was sent with: the same key with the same
    request answers the resource it created; with another request, 422."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("owner", "scope", "key", name="uq_idempotency_keys_key"),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    scope: Mapped[str] = mapped_column(String(32))  # which operation
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the request
    resource_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- engine


class Catalog:
    """An engine and its session factory for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        u = make_url(url)
        # A server may restart under a pooled connection; a SQLite file cannot.
        kwargs: dict[str, Any] = {"pool_pre_ping": u.get_backend_name() != "sqlite"}
        if u.get_backend_name() == "sqlite":
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        _live_catalogs.add(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def migrate(self, revision: str = "head") -> None:
        upgrade(self.url, revision)

    def dispose(self) -> None:
        self.engine.dispose()
        _live_catalogs.discard(self)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


_live_catalogs: set[Catalog] = set()
_catalogs: dict[str, Catalog] = {}
_catalogs_lock = threading.Lock()


def get_catalog(url: str) -> Catalog:
    """The process-wide catalog for `url` (one engine per URL)."""
    with _catalogs_lock:
        cat = _catalogs.get(url)
        if cat is None:
            cat = _catalogs[url] = Catalog(url)
        return cat


def _after_fork_in_child() -> None:
    # A forked worker child must not share pooled connections with its parent.
    for cat in list(_live_catalogs):
        cat.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- migrations


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if make_url(url).get_backend_name() == "sqlite":
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def artifact_in_use(session: Session, sha256: str) -> bool:
    """Whether any row still references the artifact (content is shared between rows)."""
    from sqlalchemy import select

    for column in (
        Model.weights_sha256,
        Dataset.archive_sha256,
        ComponentSet.artifact_sha256,
        Assembly.artifact_sha256,
    ):
        if session.scalar(select(column).where(column == sha256).limit(1)) is not None:
            return True
    return False
