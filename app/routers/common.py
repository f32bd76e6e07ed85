"""Helpers shared by the routers: owned lookups, uploads, class resolution."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Header, HTTPException, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.catalog import MAX_ID, Alias, IdempotencyKey, RegisteredName, artifact_in_use
from app.errors import ApiError
from app.storage import Storage

# An id in the URL path: 1..MAX_ID, so that a huge number is a 422 (never reaches the driver).
PathId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


def owned(session: Session, cls, ident: int, owner: str, what: str):
    """The row if it exists and belongs to `owner`; otherwise 404 (never 403)."""
    row = session.get(cls, ident)
    if row is None or row.owner != owner:
        raise HTTPException(404, f"{what} {ident} not found")
    return row


# A model or assembly in the URL path: its id, `name@alias`, `name/version` or `name`
# (the latest version).
PathRef = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=320,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="id (`12`), `name@alias`, `name/version` or `name` (its latest version)",
        examples=["12", "digits@champion", "digits/2"],
    ),
]
NAME_RULE = "a name must not contain '/', '@' or control characters and must not be only digits"
ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$"


def check_name(name: str) -> str:
    """422 for a name that `PathRef` could not tell apart from an id or a version."""
    control = any(ord(c) < 32 or ord(c) == 127 for c in name)
    if "/" in name or "@" in name or name.strip().isdigit() or not name.strip() or control:
        raise unprocessable(f"name {name!r}: {NAME_RULE}")
    return name


def next_version(session: Session, kind: str, owner: str, name: str) -> int:
    """The next version number of `name` (never one given before, even if deleted)."""
    row = session.scalar(
        select(RegisteredName)
        .where(RegisteredName.owner == owner, RegisteredName.kind == kind)
        .where(RegisteredName.name == name)
        .with_for_update()
    )
    if row is None:
        row = RegisteredName(owner=owner, kind=kind, name=name, last_version=0)
        session.add(row)
    row.last_version += 1
    session.flush()
    return row.last_version


def resolve(session: Session, cls, ref: str, owner: str, what: str):
    """The owner's row that `ref` names (see PathRef); 404 when there is none."""
    if ref.isascii() and ref.isdigit():
        ident = int(ref)
        if not 1 <= ident <= MAX_ID:
            raise unprocessable(f"{what} id {ref} is out of range (1..{MAX_ID})")
        return owned(session, cls, ident, owner, what)
    if "@" in ref:
        name, _, alias = ref.rpartition("@")
        target = session.scalar(
            select(Alias.target_id).where(
                Alias.owner == owner, Alias.kind == what, Alias.name == name, Alias.alias == alias
            )
        )
        if target is None:
            raise HTTPException(404, f"{what} {ref} not found (no such alias)")
        return owned(session, cls, target, owner, what)
    name, slash, version = ref.rpartition("/")
    q = select(cls).where(cls.owner == owner)
    if slash and version.isascii() and version.isdigit() and len(version) <= 9:
        q = q.where(cls.name == name, cls.version == int(version))
    else:
        q = q.where(cls.name == ref).order_by(cls.version.desc()).limit(1)
    row = session.scalar(q)
    if row is None:
        raise HTTPException(404, f"{what} {ref} not found")
    return row


def aliases_of(session: Session, kind: str, owner: str, ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        rows = session.execute(
            select(Alias.target_id, Alias.alias)
            .where(Alias.owner == owner, Alias.kind == kind, Alias.target_id.in_(ids))
            .order_by(Alias.alias)
        )
        for target, alias in rows:
            out[target].append(alias)
    return out


def set_aliases(session: Session, kind: str, row, aliases: list[str]) -> None:
    """Makes `aliases` point at `row` (moving them from other versions of its name) and
    removes the row's other aliases."""
    current = session.scalars(
        select(Alias).where(Alias.owner == row.owner, Alias.kind == kind, Alias.name == row.name)
    ).all()
    wanted = set(aliases)
    for a in current:
        if a.alias in wanted:
            a.target_id = row.id
            wanted.discard(a.alias)
        elif a.target_id == row.id:
            session.delete(a)
    for alias in sorted(wanted):
        session.add(Alias(owner=row.owner, kind=kind, name=row.name, alias=alias, target_id=row.id))
    session.flush()


def drop_aliases(session: Session, kind: str, row) -> None:
    for a in session.scalars(
        select(Alias).where(Alias.owner == row.owner, Alias.kind == kind, Alias.target_id == row.id)
    ):
        session.delete(a)


IdemKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Send the same key again with the same request to get the resource the "
        "first one created instead of a second one (a different request with it: 422).",
    ),
]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replayed(session: Session, owner: str, scope: str, key: str | None, fp: str) -> int | None:
    """The id of the resource an earlier request with this Idempotency-Key created, if any
    (422 when that request was a different one)."""
    if key is None:
        return None
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.owner == owner, IdempotencyKey.scope == scope, IdempotencyKey.key == key
        )
    )
    if row is None:
        return None
    if row.fingerprint != fp:
        raise ApiError(
            422,
            f"Idempotency-Key {key!r} was sent before with a different request; use a new key",
            "idempotency-key-reused",
        )
    return row.resource_id


def remember(
    session: Session, owner: str, scope: str, key: str | None, fp: str, resource_id: int
) -> None:
    """Records the key in the transaction that creates the resource (a concurrent request
    with the same key then fails on the unique constraint, and nothing of it is kept)."""
    if key is not None:
        session.add(
            IdempotencyKey(
                owner=owner, scope=scope, key=key, fingerprint=fp, resource_id=resource_id
            )
        )
        session.flush()


Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many items")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="skip this many items first")]


def page(session: Session, query, request: Request, response: Response, limit: int, offset: int):
    """One page of `query`'s rows; the total goes in `X-Total-Count` and the next page's
    URL in `Link: <...>; rel="next"` (the body stays a JSON array)."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = session.scalars(query.limit(limit).offset(offset)).all()
    response.headers["X-Total-Count"] = str(total)
    if offset + len(rows) < total:
        params = {**request.query_params, "limit": str(limit), "offset": str(offset + limit)}
        query_string = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        response.headers["Link"] = f'<{request.url.path}?{query_string}>; rel="next"'
    return rows


def unprocessable(msg: str) -> HTTPException:
    return HTTPException(422, msg)


def parse_json_field(raw: str, field: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise unprocessable(f"{field} must be JSON: {exc}") from None


def save_upload(
    storage: Storage, upload: UploadFile, max_bytes: int, field: str, suffix: str = ""
) -> Path:
    """Stream an upload into storage's tmp/ (413 over `max_bytes`, 422 when empty)."""
    path = storage.put_stream(upload.file, max_bytes=max_bytes, suffix=suffix)
    if path.stat().st_size == 0:
        path.unlink(missing_ok=True)
        raise unprocessable(f"{field}: the uploaded file is empty")
    return path


def drop_artifacts(session: Session, storage: Storage, shas: set[str]) -> None:
    """Delete artifacts no row references any more (call after the rows are gone)."""
    for sha in shas:
        if sha and not artifact_in_use(session, sha):
            with contextlib.suppress(OSError):
                storage.delete(sha)


def resolve_classes(class_names: list[str], wanted: list[int | str], what: str) -> list[int]:
    """Class names or indices -> indices, in the given order (UnknownClassError -> 422).

    As in lego_core, a string of digits that is not a class name counts as an index.
    """
    from lego_core.errors import UnknownClassError

    out: list[int] = []
    seen: set[int] = set()
    index = {name: i for i, name in reversed(list(enumerate(class_names)))}  # first wins
    for c in wanted:
        if isinstance(c, bool):
            raise UnknownClassError(f"{what} has no class {c!r}")
        if isinstance(c, int):
            if not 0 <= c < len(class_names):
                raise UnknownClassError(
                    f"{what} has no class index {c} (it has {len(class_names)} classes)"
                )
            i = c
        elif c in index:
            i = index[c]
        elif _small_index(c) is not None and _small_index(c) < len(class_names):
            i = _small_index(c)
        else:
            raise UnknownClassError(
                f"{what} has no class {c!r}; its classes are {', '.join(map(str, class_names))}"
            )
        if i in seen:
            raise UnknownClassError(f"class {class_names[i]!r} of {what} is listed twice")
        seen.add(i)
        out.append(i)
    return out


def _small_index(text: str) -> int | None:
    """A class index written as a string ("3"); None for anything else (unicode digits such
    as "²" and 5000-digit numbers included, which int() refuses)."""
    t = text.strip()
    return int(t) if t.isascii() and t.isdigit() and len(t) <= 9 else None
