"""Migrations: empty -> head -> base -> head, on SQLite and on PostgreSQL; head matches
the models in app.catalog."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

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
