"""The artifact disk fills up: a small tmpfs mounted as LEGO_STORAGE_DIR (needs root).

Quick (embedded app): datasets are uploaded until the disk is full; the uploads that do
not fit answer 507 (or 413), model uploads too, nothing is left behind (no orphan files,
no temp files, no rows without their artifact), and once a dataset is deleted uploads work
again.

Soak (`make soak`, full stack): the same against `lego serve` + `lego worker` on PostgreSQL
and Redis, and an assembly whose export hits the full disk fails with a reason, then
succeeds once there is room.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from rel_helpers import (
    Traffic,
    assembly_body,
    assert_consistent,
    audit,
    build_ready,
    full_stack,
    setup_journey,
)
from service_helpers import JOURNEY_NEEDS, make_tar_gz, needs_lego

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.slow]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def expected_5xx(traffic: Traffic) -> dict:
    """The traffic summary, with 507 (the expected answer) apart from other 5xx."""
    s = traffic.summary()
    s.pop("errors_5xx")
    s["errors_5xx_other_than_507"] = sum(
        v for k, v in traffic.by_status.items() if k >= 500 and k != 507
    )
    return s


def filler(mnist_members, n: int, kib: int = 256) -> bytes:
    """A valid dataset archive made unique (and incompressible) by a README of random bytes."""
    two = {k: mnist_members[k][:2] for k in ("1", "7")}
    blob = make_tar_gz(two)
    import io
    import tarfile

    buf = io.BytesIO(blob)
    out = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="r:gz") as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo(f"README-{n}.txt")
        data = secrets.token_bytes(kib * 1024)
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


def fill(http, mnist_members, traffic: Traffic, limit: int = 400) -> tuple[list[int], list]:
    """Upload fillers until one is refused; returns (ids stored, refused responses)."""
    stored, refused = [], []
    for n in range(limit):
        r = http.post(
            "/api/v1/datasets",
            data={"name": f"filler-{n}"},
            files={"archive": (f"f{n}.tar", filler(mnist_members, n))},
        )
        traffic.add(r.status_code)
        if r.status_code == 201:
            stored.append(r.json()["id"])
            continue
        refused.append(r)
        if len(refused) >= 3:
            break
    return stored, refused


def test_disk_full_embedded(tmp_path, trained_lenets, mnist_small, mnist_members, figures):
    traffic = Traffic()
    with tmpfs(tmp_path / "disk", "2m") as disk:
        gen = build_ready(tmp_path / "var", trained_lenets, mnist_small, storage_dir=disk)
        ready = next(gen)
        try:
            http, svc = ready.http, ready.svc
            stored, refused = fill(http, mnist_members, traffic)
            assert refused, "the disk never filled"
            for r in refused:
                assert r.status_code in (507, 413), (r.status_code, r.text)
                assert "full" in r.json()["detail"] or "limit" in r.json()["detail"]
            weights = trained_lenets.low.read_bytes()
            rm = http.post(
                "/api/v1/models",
                data={
                    "name": "m",
                    "arch": "lenet",
                    "class_names": '["0","1","2","3","4"]',
                    "input_spec": '{"channels":1,"height":28,"width":28,"mean":[0.1307],'
                    '"std":[0.3081]}',
                },
                files={"weights": ("w.pt", weights)},
            )
            traffic.add(rm.status_code)
            assert rm.status_code == 507, rm.text
            full_report = audit(svc.catalog, svc.storage)
            assert_consistent(full_report)
            # Room again: delete two fillers, and the next upload fits.
            for ds in stored[-2:]:
                assert http.delete(f"/api/v1/datasets/{ds}").status_code == 204
            r = http.post(
                "/api/v1/datasets",
                data={"name": "after"},
                files={"archive": ("a.tar", filler(mnist_members, 999, kib=64))},
            )
            traffic.add(r.status_code)
            assert r.status_code == 201, r.text
            after = audit(svc.catalog, svc.storage)
            assert_consistent(after)
            figures.record(
                "disk_full_embedded",
                disk="tmpfs 2 MiB",
                uploads_stored_before_full=len(stored),
                refused=[f"{r.status_code} {r.json()['detail']}" for r in refused],
                model_upload_when_full=f"{rm.status_code} {rm.json()['detail']}",
                **expected_5xx(traffic),
                audit_when_full=full_report,
                audit_after_freeing=after,
            )
        finally:
            with contextlib.suppress(StopIteration):
                next(gen)


@pytest.mark.soak
@pytest.mark.fullstack
def test_disk_full_full_stack(tmp_path, trained_lenets, mnist_small, mnist_members, figures):
    traffic = Traffic()
    with (
        tmpfs(tmp_path / "disk", "4m") as disk,
        # 4 MiB disk, 256 KiB fillers: ready while empty, not ready once full.
        full_stack(tmp_path, workers=1, storage_dir=disk, min_free_disk_bytes=300 << 10) as st,
    ):
        http = st.http()
        ids = setup_journey(http, trained_lenets, mnist_small)
        stored, refused = fill(http, mnist_members, traffic)
        assert refused and all(r.status_code in (507, 413) for r in refused), [
            (r.status_code, r.text) for r in refused
        ]
        # An assembly whose export does not fit: failed, with the reason.
        body = assembly_body(ids["a"], ["1", "2", "4"], ids["b"], ["5", "8"])
        r = http.post("/api/v1/assemblies", json=body)
        traffic.add(r.status_code)
        assert r.status_code == 202, r.text
        failed = http.wait_assembly(r.json()["id"])
        assert failed["status"] == "failed" and "full" in failed["error"], failed
        ready = st.http().client.get("/readyz")
        storage_check = ready.json()["checks"]["storage"]
        assert ready.status_code == 503 and "under the" in storage_check["detail"]
        full_report = st.audit()
        assert_consistent(full_report)
        for ds in stored:
            assert http.delete(f"/api/v1/datasets/{ds}").status_code == 204
        r = http.post("/api/v1/assemblies", json=body)
        traffic.add(r.status_code)
        asm = http.wait_assembly(r.json()["id"])
        assert asm["status"] == "succeeded", asm
        after = st.audit()
        assert_consistent(after)
        assert st.http().client.get("/readyz").status_code == 200
        figures.record(
            "disk_full_full_stack",
            disk="tmpfs 4 MiB",
            uploads_stored_before_full=len(stored),
            refused=dict(Counter(str(r.status_code) for r in refused)),
            assembly_when_full=f"{failed['status']}: {failed['error'][:120]}",
            readyz_when_full=ready.status_code,
            **expected_5xx(traffic),
            audit_when_full=full_report,
            audit_after_freeing=after,
        )
