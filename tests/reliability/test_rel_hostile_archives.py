"""Hostile dataset archives, with the service's default limits.

Each archive must get a clear 4xx (a message naming the problem), nothing may be written
outside the storage directory (the members' target paths are checked), the catalog and
storage must be as before, and the API process's memory must stay bounded while the
archive is read (RSS sampled every 20 ms during the request).

Members that try to escape (`../`, absolute paths, symlinks, hard links), decompression
bombs (a tar.gz member that expands to 1 GiB, a zip member of 24 MiB at 1000:1, a PNG that decodes
to 144 megapixels, a gzip stream of 256 MiB of zeros), 100,000 tiny members, a non-image
file among images, an empty class folder, and images that are truncated, 1x1, 20000x20000,
CMYK, 16-bit, animated.
"""

from __future__ import annotations

import gzip
import io
import secrets
import stat
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from rel_helpers import MiB, RssSampler, hostile_images, png_bomb
from service_helpers import needs_lego, snapshot

pytestmark = needs_lego("inspect_image_folder", "ArchiveLimits")

# Memory the API may use beyond its baseline while it reads one hostile archive.
MEMORY_BOUND = 256 * MiB
TAG = secrets.token_hex(4)
ABS_TARGET = Path(f"/tmp/lego-rel-evil-{TAG}.png")
REL_NAME = f"lego-rel-evil-{TAG}.png"


def tar_gz(members, level: int = 6) -> bytes:
    """members: (name, bytes) or TarInfo (links, folders)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=level) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def zip_of(members) -> bytes:
    """members: (name, bytes) or (ZipInfo, bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members:
            zf.writestr(name, blob)
    return buf.getvalue()


def link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def tar_gz_big_member(name: str, size: int) -> bytes:
    """A tar.gz with one member of `size` zero bytes, streamed (small file, huge expansion)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        info = tarfile.TarInfo(name)
        info.size = size
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        zeros = b"\x00" * (4 * MiB)
        left = size
        while left:
            n = min(left, len(zeros))
            gz.write(zeros[:n])
            left -= n
        gz.write(b"\x00" * (-size % 512) + b"\x00" * 1024)
    return buf.getvalue()


def gzip_of_zeros(size: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\x00" * (4 * MiB)
    parts = [comp.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join(parts) + comp.flush()


def zip_bomb(name: str, size: int) -> bytes:
    buf = io.BytesIO()
    zeros = b"\x00" * (4 * MiB)
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open(name, "w", force_zip64=True) as f,
    ):
        for _ in range(size // len(zeros)):
            f.write(zeros)
    return buf.getvalue()


def many_members(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for i in range(n):
            info = tarfile.TarInfo(f"cls/note-{i:06d}.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def cases(png: bytes) -> dict[str, tuple[bytes, str, int, str]]:
    """name -> (archive bytes, file name, expected status, a word the message must hold)."""
    ok = ("cls/a.png", png)
    up = "../" * 6
    out = {
        "tar ../ member": (tar_gz([ok, (f"cls/{up}{REL_NAME}", png)]), "x.tar.gz", 422, ".."),
        "tar ../ at the top": (tar_gz([ok, (f"../{REL_NAME}", png)]), "x.tar.gz", 422, ".."),
        "tar backslash ..": (tar_gz([ok, (f"cls\\..\\..\\{REL_NAME}", png)]), "x.tgz", 422, ".."),
        "tar absolute path": (tar_gz([ok, (str(ABS_TARGET), png)]), "x.tar.gz", 422, "absolute"),
        "tar drive letter": (tar_gz([ok, (f"C:/{REL_NAME}", png)]), "x.tar.gz", 422, "absolute"),
        "tar symlink out": (
            tar_gz([ok, link("cls/b.png", "/etc/passwd")]),
            "x.tar.gz",
            422,
            "link",
        ),
        "tar symlink then write through it": (
            tar_gz([ok, link("cls/dir", "/tmp"), (f"cls/dir/{REL_NAME}", png)]),
            "x.tar.gz",
            422,
            "link",
        ),
        "tar hard link": (
            tar_gz([ok, link("cls/h.png", "/etc/shadow", True)]),
            "x.tgz",
            422,
            "link",
        ),
        "zip ../ member": (zip_of([ok, (f"{up}{REL_NAME}", png)]), "x.zip", 422, ".."),
        "zip absolute path": (zip_of([ok, (str(ABS_TARGET), png)]), "x.zip", 422, "absolute"),
        "zip symlink": (
            zip_of([ok, zip_symlink("cls/l.png", "/etc/passwd")]),
            "x.zip",
            422,
            "link",
        ),
        "tar.gz member of 1 GiB zeros": (
            tar_gz_big_member("cls/huge.png", 1024 * MiB),
            "x.tar.gz",
            422,
            "limit",
        ),
        "zip member of 24 MiB at 1000:1": (
            zip_bomb("cls/huge.png", 24 * MiB),
            "x.zip",
            422,
            "bomb",
        ),
        "gzip stream of 256 MiB zeros": (gzip_of_zeros(256 * MiB), "x.tar.gz", 422, ""),
        "PNG bomb (12000x12000)": (
            tar_gz([ok, ("cls/bomb.png", png_bomb())]),
            "x.tgz",
            422,
            "pixel",
        ),
        "100,000 tiny members": (many_members(100_000), "x.tar.gz", 422, "not an image"),
        "non-image among images": (
            tar_gz([ok, ("cls/b.png", png), ("cls/notes.txt", b"hello")]),
            "x.tar.gz",
            422,
            "not an image",
        ),
        "image-named garbage": (
            tar_gz([ok, ("cls/b.png", b"\x89PNG garbage")]),
            "x.tar.gz",
            422,
            "b.png",
        ),
        "empty class folder": (
            tar_gz([ok, folder("empty"), folder("cls")]),
            "x.tar.gz",
            422,
            "no images",
        ),
        "zip empty class folder": (zip_of([ok, ("empty/", b"")]), "x.zip", 422, "no images"),
        "only empty folders": (tar_gz([folder("a"), folder("b")]), "x.tar.gz", 422, "no images"),
    }
    for name, (blob, accepted) in hostile_images(png).items():
        word = "" if accepted else "x.png"
        out[f"image: {name}"] = (
            tar_gz([ok, ("cls/x.png", blob)]),
            "x.tar.gz",
            201 if accepted else 422,
            word,
        )
    return out


@pytest.fixture(scope="module")
def built(mnist_members):
    return cases(mnist_members["1"][0][1])


@pytest.fixture(scope="module")
def results():
    return {}


def escaped_paths(storage_root: Path) -> list[Path]:
    """Where an extracting reader would have written the escaping members."""
    out = [ABS_TARGET, Path("/tmp") / REL_NAME, Path.cwd() / REL_NAME]
    for base in (storage_root, storage_root / "tmp", storage_root / "work"):
        p = base
        for _ in range(8):
            out.append(p / REL_NAME)
            p = p.parent
    return out


CASE_NAMES = [
    "tar ../ member",
    "tar ../ at the top",
    "tar backslash ..",
    "tar absolute path",
    "tar drive letter",
    "tar symlink out",
    "tar symlink then write through it",
    "tar hard link",
    "zip ../ member",
    "zip absolute path",
    "zip symlink",
    "tar.gz member of 1 GiB zeros",
    "zip member of 24 MiB at 1000:1",
    "gzip stream of 256 MiB zeros",
    "PNG bomb (12000x12000)",
    "100,000 tiny members",
    "non-image among images",
    "image-named garbage",
    "empty class folder",
    "zip empty class folder",
    "only empty folders",
    "image: truncated PNG",
    "image: PNG header only",
    "image: 1x1 pixel",
    "image: 20000x20000 pixels (header)",
    "image: CMYK JPEG",
    "image: 16-bit PNG",
    "image: animated GIF",
    "image: RGBA PNG",
    "image: palette PNG",
    "image: zero bytes",
    "image: text",
    "image: SVG",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_archive(api, built, case, results):
    blob, filename, expected, word = built[case]
    before = snapshot(api.svc)
    work_before = sorted(p for p in api.svc.storage.work.rglob("*"))
    with RssSampler() as mem:
        r = api.post(
            "/api/v1/datasets",
            data={"name": "hostile"},
            files={"archive": (filename, blob, "application/octet-stream")},
        )
    assert r.status_code == expected, (case, r.status_code, r.text[:500])
    if expected >= 400:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail, case
        assert word in detail, (case, detail)
        assert snapshot(api.svc) == before, case
        assert sorted(p for p in api.svc.storage.work.rglob("*")) == work_before
    else:
        assert r.json()["classes"] == {"cls": 2}, r.text
        assert api.delete(f"/api/v1/datasets/{r.json()['id']}").status_code == 204
    for p in escaped_paths(api.svc.storage.root):
        assert not p.exists(), f"{case}: {p} was written"
    assert mem.growth < MEMORY_BOUND, f"{case}: RSS grew by {mem.growth / MiB:.0f} MiB"
    results[case] = {
        "archive_bytes": len(blob),
        "status": r.status_code,
        "rss_growth_mib": round(mem.growth / MiB, 1),
        "detail": r.json().get("detail", "")[:160] if expected >= 400 else "accepted",
    }


def test_zz_record(results, figures):
    if results:
        figures.record(
            "hostile_archives",
            requests=len(results),
            by_status=dict(Counter(str(v["status"]) for v in results.values())),
            written_outside=0,
            rows_or_files_left=0,
            max_rss_growth_mib=max(v["rss_growth_mib"] for v in results.values()),
            memory_bound_mib=MEMORY_BOUND // MiB,
            cases=results,
        )
