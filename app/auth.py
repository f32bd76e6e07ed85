"""API keys: created by `lego keys create`, stored hashed, sent as `Authorization: Bearer`."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import HTTPException, Request
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.catalog import ApiKey, Catalog, utcnow

KEY_PREFIX = "lego_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is enough (no salt/KDF needed).
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    session: Session, name: str, owner: str | None = None, key: str | None = None
) -> str:
    """Store a key (a fresh one unless `key` is given) and return it in clear, once."""
    key = key or new_key()
    session.add(ApiKey(name=name, owner=owner or name, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return key


def revoke_key(session: Session, ident: str) -> int:
    """Revoke keys by id, name, clear key or prefix; returns how many were revoked."""
    conds = [ApiKey.name == ident, ApiKey.key_hash == hash_key(ident), ApiKey.prefix == ident]
    if ident.isdigit():
        conds.append(ApiKey.id == int(ident))
    keys = session.scalars(select(ApiKey).where(or_(*conds), ApiKey.revoked_at.is_(None))).all()
    for k in keys:
        k.revoked_at = utcnow()
    return len(keys)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def ensure_key(catalog: Catalog, key: str, name: str, owner: str) -> bool:
    """Make sure `key` exists (the bootstrap key); True when it was created now."""
    with catalog.session() as s:
        if s.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))) is not None:
            return False
        create_key(s, name, owner, key)
        return True


def any_key(catalog: Catalog) -> bool:
    with catalog.session() as s:
        return s.scalar(select(ApiKey.id).limit(1)) is not None


def owner_of(session: Session, key: str) -> str | None:
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    return row.owner if row else None


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key.strip()


async def bearer_key(request: Request) -> str:
    """The request's bearer key as sent (not yet checked), else 401. A dependency of
    the predict routes, which check it in the same query as the assembly; async, so
    that FastAPI calls it without a thread-pool hop."""
    return _bearer(request)


def invalid_key() -> HTTPException:
    return HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})


def current_owner(request: Request) -> str:
    """FastAPI dependency: the owner of the request's bearer key, else 401."""
    key = _bearer(request)
    with request.app.state.catalog.session() as s:
        owner = owner_of(s, key)
    if owner is None:
        raise invalid_key()
    return owner
