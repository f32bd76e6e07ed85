"""Helpers shared by the routers: owned lookups, uploads, class resolution."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException, UploadFile
from fastapi import Path as PathParam
from sqlalchemy.orm import Session

from app.catalog import MAX_ID, artifact_in_use
from app.storage import Storage

# An id in the URL path: 1..MAX_ID, so that a huge number is a 422 (never reaches the driver).
PathId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


def owned(session: Session, cls, ident: int, owner: str, what: str):
    """The row if it exists and belongs to `owner`; otherwise 404 (never 403)."""
    row = session.get(cls, ident)
    if row is None or row.owner != owner:
        raise HTTPException(404, f"{what} {ident} not found")
    return row


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
