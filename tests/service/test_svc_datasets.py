"""POST /datasets: good archives, and bad ones that leave nothing behind."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
from service_helpers import make_tar_gz, needs_lego, snapshot

pytestmark = needs_lego("inspect_image_folder", "ArchiveLimits")


def upload(api, blob: bytes, filename="data.tar.gz", name="ds", who="alice"):
    return api.post(
        "/api/v1/datasets",
        who=who,
        data={"name": name},
        files={"archive": (filename, blob, "application/octet-stream")},
    )


def tar_with(members: list[tarfile.TarInfo | tuple[str, bytes]], mode="w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def zip_with(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, blob in members:
            zf.writestr(name, blob)
    return buf.getvalue()


def test_upload_tar_gz_zip_and_tar(api, mnist_small, mnist_members):
    r = upload(api, mnist_small)
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["classes"] == {str(i): 20 for i in range(10)}
    assert d["num_images"] == 200 and d["name"] == "ds"
    assert api.svc.storage.exists(d["archive_sha256"])

    two = {k: mnist_members[k][:3] for k in ("3", "7")}
    z = zip_with([(f"{c}/{n}", b) for c in two for n, b in two[c]])
    r = upload(api, z, "d.zip", "zipped")
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == {"3": 3, "7": 3}
    t = tar_with([(f"{c}/{n}", b) for c in two for n, b in two[c]], mode="w")
    r = upload(api, t, "d.tar", "plain")
    assert r.status_code == 201 and r.json()["classes"] == {"3": 3, "7": 3}

    listed = api.get("/api/v1/datasets").json()
    assert [x["name"] for x in listed] == ["ds", "zipped", "plain"]
    assert api.get(f"/api/v1/datasets/{d['id']}").json()["id"] == d["id"]
    r = api.get("/api/v1/datasets", params={"name": "zipped"})
    assert [x["name"] for x in r.json()] == ["zipped"] and r.headers["x-total-count"] == "1"


def test_idempotency_key_and_location(api, mnist_members):
    two = {k: mnist_members[k][:2] for k in ("3", "7")}
    blob = zip_with([(f"{c}/{n}", b) for c in two for n, b in two[c]])
    key = {"Idempotency-Key": "upload-1"}

    def post(name="ds"):
        files = {"archive": ("d.zip", blob, "application/octet-stream")}
        return api.post("/api/v1/datasets", data={"name": name}, files=files, headers=key)

    first, again = post(), post()
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert first.headers["location"] == again.headers["location"]
    assert first.headers["location"] == f"/api/v1/datasets/{first.json()['id']}"
    assert post("renamed").json()["code"] == "idempotency-key-reused"
    assert api.get("/api/v1/datasets").headers["x-total-count"] == "1"


def test_server_side_path(api, mnist_small, tmp_path):
    data = tmp_path / "server-data"
    data.mkdir()
    (data / "small.tar.gz").write_bytes(mnist_small)
    api.svc.settings.data_dir = data
    r = api.post("/api/v1/datasets", data={"name": "srv", "path": "small.tar.gz"})
    assert r.status_code == 201, r.text
    assert r.json()["num_images"] == 200
    before = snapshot(api.svc)
    for bad in ("../server-data/../../etc/passwd", "/etc/passwd", "missing.tar.gz"):
        r = api.post("/api/v1/datasets", data={"name": "x", "path": bad})
        assert r.status_code == 422 and "data directory" in r.json()["detail"]
    assert snapshot(api.svc) == before


def _png(mnist_members):
    return mnist_members["1"][0][1]


def bad_archives(mnist_members):
    png = _png(mnist_members)
    link = tarfile.TarInfo("cls/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("cls/hard.png")
    hard.type, hard.linkname = tarfile.LNKTYPE, "cls/a.png"
    return {
        "not an archive": (b"this is plain text, not an archive" * 10, "x.tar.gz", "not a tar"),
        "no classes": (tar_with([("README.txt", b"hello")]), "x.tar.gz", ""),
        "unreadable image": (
            tar_with([("cls/a.png", png), ("cls/b.png", b"not a png")]),
            "x.tar.gz",
            "b.png",
        ),
        "dot-dot": (tar_with([("cls/a.png", png), ("../evil.png", png)]), "x.tar.gz", ".."),
        "absolute": (tar_with([("cls/a.png", png), ("/tmp/evil.png", png)]), "x.tar.gz", ""),
        "symlink": (tar_with([("cls/a.png", png), link]), "x.tar.gz", "link"),
        "hardlink": (tar_with([("cls/a.png", png), hard]), "x.tar.gz", "hard"),
        "zip dot-dot": (zip_with([("cls/a.png", png), ("../../evil.png", png)]), "x.zip", ".."),
        "truncated": (make_tar_gz({"cls": [("a.png", png)] * 3})[:60], "x.tar.gz", ""),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not an archive",
        "no classes",
        "unreadable image",
        "dot-dot",
        "absolute",
        "symlink",
        "hardlink",
        "zip dot-dot",
        "truncated",
    ],
)
def test_bad_archives_are_422_and_leave_nothing(api, mnist_members, case, tmp_path):
    blob, filename, word = bad_archives(mnist_members)[case]
    before = snapshot(api.svc)
    r = upload(api, blob, filename)
    assert r.status_code == 422, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    assert word in detail, (case, detail)
    assert "u-" not in detail  # the message names the user's file, not a temp file
    assert snapshot(api.svc) == before
    assert not list(tmp_path.parent.rglob("evil.png"))


def test_empty_missing_and_oversized_uploads(api, mnist_small):
    before = snapshot(api.svc)
    r = upload(api, b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = api.post("/api/v1/datasets", data={"name": "x"})
    assert r.status_code == 422
    r = api.post("/api/v1/datasets", files={"archive": ("a.tar.gz", mnist_small)})
    assert r.status_code == 422  # no name
    api.svc.settings.max_dataset_bytes = len(mnist_small) - 1
    r = upload(api, mnist_small)
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]
    assert snapshot(api.svc) == before


def test_another_owner_cannot_see_or_touch(api, mnist_small):
    d = upload(api, mnist_small).json()
    assert api.get(f"/api/v1/datasets/{d['id']}", who="bob").status_code == 404
    assert api.delete(f"/api/v1/datasets/{d['id']}", who="bob").status_code == 404
    assert api.get("/api/v1/datasets", who="bob").json() == []
    # The same content uploaded by bob is his own dataset sharing the stored object.
    e = upload(api, mnist_small, who="bob").json()
    assert e["id"] != d["id"] and e["archive_sha256"] == d["archive_sha256"]
    assert api.delete(f"/api/v1/datasets/{d['id']}").status_code == 204
    assert api.svc.storage.exists(d["archive_sha256"])  # still bob's
    assert api.delete(f"/api/v1/datasets/{e['id']}", who="bob").status_code == 204
    assert not api.svc.storage.exists(d["archive_sha256"])
    assert api.get(f"/api/v1/datasets/{d['id']}").status_code == 404
