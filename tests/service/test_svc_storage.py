"""Artifact storage: content-addressed, atomic, limits; settings from LEGO_ variables."""

from __future__ import annotations

import hashlib
import io

import pytest

from app.settings import Settings
from app.storage import Storage, UploadTooLarge


def test_store_is_content_addressed_and_idempotent(tmp_path):
    st = Storage(tmp_path / "s")
    sha = st.put_bytes(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert st.path(sha).read_bytes() == b"hello"
    assert st.path(sha).parent.name == sha[:2]
    assert st.put_bytes(b"hello") == sha
    assert st.listing() == {sha}
    assert list(st.tmp.iterdir()) == []


def test_put_stream_limit_leaves_nothing(tmp_path):
    st = Storage(tmp_path / "s")
    with pytest.raises(UploadTooLarge):
        st.put_stream(io.BytesIO(b"x" * 1000), max_bytes=999)
    assert list(st.tmp.iterdir()) == [] and st.listing() == set()
    p = st.put_stream(io.BytesIO(b"x" * 999), max_bytes=999)
    sha, size = st.store_file(p)
    assert size == 999 and not p.exists() and st.exists(sha)


def test_store_file_copies_foreign_files_and_delete(tmp_path):
    st = Storage(tmp_path / "s")
    src = tmp_path / "outside.bin"
    src.write_bytes(b"data")
    sha, _ = st.store_file(src)
    assert src.exists() and st.exists(sha)
    st.delete(sha)
    assert not st.exists(sha)
    with pytest.raises(ValueError):
        st.path("../../etc/passwd")


def test_temp_path_is_removed(tmp_path):
    st = Storage(tmp_path / "s")
    with st.temp_path(".pt") as t:
        t.write_bytes(b"partial")
    assert not t.exists()
    st.check_writable()


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGO_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("LEGO_BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("LEGO_STORAGE_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("LEGO_MAX_MODEL_BYTES", "1234")
    s = Settings()
    assert s.resolved_database_url == "postgresql+psycopg://u@h/db"
    assert not s.embedded_broker
    assert s.resolved_storage_dir == (tmp_path / "shared").resolve()
    assert s.max_model_bytes == 1234


def test_settings_embedded_default(monkeypatch, tmp_path):
    for k in ("LEGO_DATABASE_URL", "LEGO_BROKER_URL", "LEGO_STORAGE_DIR"):
        monkeypatch.delenv(k, raising=False)
    s = Settings(var_dir=tmp_path)
    assert s.embedded_broker
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'lego.db').resolve()}"
    assert s.resolved_storage_dir == (tmp_path / "artifacts").resolve()
