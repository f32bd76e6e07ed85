"""registry: ids never reused, versions and aliases of names, lineage by weights

- SQLite tables are rebuilt with AUTOINCREMENT (without it SQLite hands out
  max(id) + 1, so the id of a deleted last row came back). On both backends the
  id counters start above every id the catalog still mentions (job payloads and
  results, lineage rows), so ids deleted before this migration are not reissued
  either where a trace of them is left.
- models and assemblies get a `version` per (owner, name): existing rows are
  numbered 1, 2, ... in id order.
- registered_names: each name's version counter (a deleted version's number is not
  given again); aliases: movable names for one version (`name@alias`).
- assembly_sources copy the source model's name, version, arch and weights sha256.
- idempotency_keys: the `Idempotency-Key` of creating POSTs.
- jobs.cancel_requested_at: job cancellation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
TABLES = (  # the tables of revision 0001
    "api_keys",
    "datasets",
    "jobs",
    "models",
    "assemblies",
    "component_sets",
    "assembly_sources",
    "components",
)


def _json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _ints(values) -> list[int]:
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def id_floors(conn) -> dict[str, int]:
    """Per table, the highest id that the catalog holds or mentions anywhere."""
    floor = {t: conn.scalar(sa.text(f"SELECT MAX(id) FROM {t}")) or 0 for t in TABLES}

    def seen(table: str, ids) -> None:
        floor[table] = max([floor[table], *_ints(ids)])

    for payload, result in conn.execute(sa.text("SELECT payload, result FROM jobs")):
        p, r = _json(payload) or {}, _json(result) or {}
        if isinstance(p, dict):
            seen("models", [p.get("model_id")])
            seen("datasets", [p.get("dataset_id")])
            seen("assemblies", [p.get("assembly_id")])
        if isinstance(r, dict):
            seen("component_sets", [r.get("component_set_id")])
    for job_id, evals in conn.execute(sa.text("SELECT job_id, eval_dataset_ids FROM assemblies")):
        seen("jobs", [job_id])
        seen("datasets", _json(evals) or [])
    for model_id, dataset_id, job_id in conn.execute(
        sa.text("SELECT model_id, dataset_id, job_id FROM component_sets")
    ):
        seen("models", [model_id])
        seen("datasets", [dataset_id])
        seen("jobs", [job_id])
    for model_id, cs_id in conn.execute(
        sa.text("SELECT model_id, component_set_id FROM assembly_sources")
    ):
        seen("models", [model_id])
        seen("component_sets", [cs_id])
    return floor


def number_versions(conn, table: str) -> None:
    rows = conn.execute(sa.text(f"SELECT id, owner, name FROM {table} ORDER BY id")).all()
    counts: dict[tuple[str, str], int] = {}
    for ident, owner, name in rows:
        counts[(owner, name)] = counts.get((owner, name), 0) + 1
        conn.execute(
            sa.text(f"UPDATE {table} SET version = :v WHERE id = :id"),
            {"v": counts[(owner, name)], "id": ident},
        )


def upgrade() -> None:
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    floors = id_floors(conn)

    for table in ("models", "assemblies"):
        op.add_column(table, sa.Column("version", sa.Integer(), nullable=True))
        number_versions(conn, table)
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("cancel_requested_at", TS, nullable=True))
    with op.batch_alter_table("assembly_sources") as b:
        b.add_column(sa.Column("model_name", sa.String(200), nullable=True))
        b.add_column(sa.Column("model_version", sa.Integer(), nullable=True))
        b.add_column(sa.Column("model_arch", sa.String(64), nullable=True))
        b.add_column(sa.Column("weights_sha256", sa.String(64), nullable=True))
    for col, src in (
        ("model_name", "name"),
        ("model_version", "version"),
        ("model_arch", "arch"),
        ("weights_sha256", "weights_sha256"),
    ):
        op.execute(
            f"UPDATE assembly_sources SET {col} = "
            f"(SELECT m.{src} FROM models m WHERE m.id = assembly_sources.model_id)"
        )

    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("alias", sa.String(100), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("owner", "kind", "name", "alias", name="uq_aliases_alias"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_aliases_owner", "aliases", ["owner"])
    op.create_index("ix_aliases_target_id", "aliases", ["target_id"])

    op.create_table(
        "registered_names",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("owner", "kind", "name", name="uq_registered_names_name"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_registered_names_owner", "registered_names", ["owner"])
    for table, kind in (("models", "model"), ("assemblies", "assembly")):
        op.execute(
            "INSERT INTO registered_names (owner, kind, name, last_version, created_at) "
            f"SELECT owner, '{kind}', name, MAX(version), MIN(created_at) FROM {table} "
            "GROUP BY owner, name"
        )

    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(32), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("owner", "scope", "key", name="uq_idempotency_keys_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_idempotency_keys_owner", "idempotency_keys", ["owner"])

    # Rebuilt on SQLite (AUTOINCREMENT is part of CREATE TABLE); altered in place elsewhere.
    kwargs = (
        {"recreate": "always", "table_kwargs": {"sqlite_autoincrement": True}} if sqlite else {}
    )
    for table in TABLES:
        with op.batch_alter_table(table, **kwargs) as b:
            if table in ("models", "assemblies"):
                b.alter_column("version", existing_type=sa.Integer(), nullable=False)
                b.create_unique_constraint(f"uq_{table}_version", ["owner", "name", "version"])

    for table, floor in floors.items():
        if sqlite:
            conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
            conn.execute(
                sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :n)"),
                {"t": table, "n": floor},
            )
        elif conn.dialect.name == "postgresql" and floor > 0:
            conn.execute(
                sa.text(
                    "SELECT setval(pg_get_serial_sequence(:t, 'id'), "
                    f"GREATEST(:n, (SELECT last_value FROM {table}_id_seq)))"
                ),
                {"t": table, "n": floor},
            )


def downgrade() -> None:
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    op.drop_index("ix_registered_names_owner", "registered_names")
    op.drop_table("registered_names")
    op.drop_index("ix_idempotency_keys_owner", "idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_aliases_target_id", "aliases")
    op.drop_index("ix_aliases_owner", "aliases")
    op.drop_table("aliases")
    kwargs = (
        {"recreate": "always", "table_kwargs": {"sqlite_autoincrement": False}} if sqlite else {}
    )
    for table in TABLES:
        with op.batch_alter_table(table, **kwargs) as b:
            if table in ("models", "assemblies"):
                b.drop_constraint(f"uq_{table}_version", type_="unique")
                b.drop_column("version")
            if table == "jobs":
                b.drop_column("cancel_requested_at")
            if table == "assembly_sources":
                for col in ("model_name", "model_version", "model_arch", "weights_sha256"):
                    b.drop_column(col)
