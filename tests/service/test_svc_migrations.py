"""Migrations: empty -> head -> base -> head, on SQLite and on PostgreSQL; head matches
the models in app.catalog; upgrading a catalog that had deletes never reissues their ids."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, Table, create_engine, func, inspect, select

from app.catalog import Base, current_revision, downgrade, upgrade

TABLES = {
    "api_keys",
    "models",
    "datasets",
    "component_sets",
    "components",
    "jobs",
    "assemblies",
    "assembly_sources",
    "aliases",
    "idempotency_keys",
    "registered_names",
}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    assert _tables(url) == set()
    upgrade(url)
    assert _tables(url) == TABLES
    assert current_revision(url) is not None
    assert _diff(url) == []  # the migrations build exactly what the models describe
    downgrade(url, "base")
    assert _tables(url) == set()
    assert current_revision(url) is None
    upgrade(url)
    assert _tables(url) == TABLES
    upgrade(url)  # idempotent


def test_sqlite_upgrade_downgrade_upgrade(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgres_upgrade_downgrade_upgrade(pg_url):
    _round_trip(pg_url)


def _catalog_with_deletes(url: str) -> None:
    """A catalog at revision 0001 (before ids were protected) that had deletes: models 1-4
    (3 and 4 deleted, a job still names 4), assemblies 1-2 (2 deleted)."""
    upgrade(url, "0001")
    engine = create_engine(url)
    now = datetime.now(UTC)
    try:
        meta = MetaData()
        t = {n: Table(n, meta, autoload_with=engine) for n in ("models", "jobs", "assemblies")}
        t["sources"] = Table("assembly_sources", meta, autoload_with=engine)
        with engine.begin() as c:
            for name in ("m", "m", "n", "n"):
                c.execute(
                    t["models"].insert(),
                    dict(
                        owner="alice", name=name, arch="lenet", class_names=["a"],
                        input_spec={}, weights_sha256=f"{name}" * 64, weights_bytes=1,
                        created_at=now,
                    ),
                )  # fmt: skip
            job = dict(owner="alice", status="succeeded", progress=1.0, message="", attempts=1)
            job.update(max_attempts=2, created_at=now)
            c.execute(t["jobs"].insert(), dict(job, kind="locate", payload={"model_id": 4}))
            for n in (1, 2):
                c.execute(
                    t["jobs"].insert(), dict(job, kind="assemble", payload={"assembly_id": n})
                )
                c.execute(
                    t["assemblies"].insert(),
                    dict(
                        owner="alice", name="a", options={}, eval_dataset_ids=[], classes=[],
                        job_id=n + 1, created_at=now,
                    ),
                )  # fmt: skip
                c.execute(
                    t["sources"].insert(),
                    dict(assembly_id=n, position=0, model_id=2, class_indices=[0],
                         class_names=["a"]),
                )  # fmt: skip
            c.execute(t["sources"].delete().where(t["sources"].c.assembly_id == 2))
            c.execute(t["assemblies"].delete().where(t["assemblies"].c.id == 2))
            c.execute(t["models"].delete().where(t["models"].c.id.in_([3, 4])))
    finally:
        engine.dispose()


def _upgrade_keeps_deleted_ids_retired(url: str) -> None:
    from app.catalog import Assembly, Catalog, Model

    _catalog_with_deletes(url)
    upgrade(url)
    assert _diff(url) == []
    cat = Catalog(url)
    try:
        with cat.session() as s:
            models = s.scalars(select(Model).order_by(Model.id)).all()
            assert [(m.id, m.name, m.version) for m in models] == [(1, "m", 1), (2, "m", 2)]
            a = s.get(Assembly, 1)
            src = a.sources[0]
            assert (a.version, src.model_name, src.model_version) == (1, "m", 2)
            assert src.weights_sha256 == "m" * 64 and src.model_arch == "lenet"
            new = Model(owner="alice", name="n", arch="lenet", class_names=["a"])
            new.input_spec, new.weights_sha256, new.weights_bytes = {}, "x" * 64, 1
            s.add(new)
            s.flush()
            assert new.id == 5  # not 3 (deleted without a trace) nor 4 (a job names it)
            s.add(Assembly(owner="alice", name="b", version=1))
            s.flush()
            assert s.scalar(select(func.max(Assembly.id))) == 3  # 2 is not reissued
            s.delete(new)
        with cat.session() as s:  # and from now on, a deleted last row's id stays retired
            again = Model(owner="alice", name="n", arch="lenet", class_names=["a"])
            again.input_spec, again.weights_sha256, again.weights_bytes = {}, "x" * 64, 1
            s.add(again)
            s.flush()
            assert again.id == 6
    finally:
        cat.dispose()
    downgrade(url, "0001")  # and back: the old schema, the rows kept
    assert current_revision(url) == "0001"


def test_sqlite_upgrade_after_deletes_never_reuses_ids(tmp_path):
    _upgrade_keeps_deleted_ids_retired(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgres_upgrade_after_deletes_never_reuses_ids(pg_url):
    _upgrade_keeps_deleted_ids_retired(pg_url)
