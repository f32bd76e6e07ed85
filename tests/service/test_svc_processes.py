"""`lego serve --processes 2` on the embedded default (SQLite catalog, in-process job
runners): real uvicorn API processes on one port. The catalog is migrated once; the
jobs run once although every process has a runner; predictions answered by both
processes equal the downloaded model's, computed here."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from service_helpers import (
    JOURNEY_NEEDS,
    Http,
    Proc,
    free_port,
    needs_lego,
    register,
    service_env,
)

pytestmark = [pytest.mark.slow]

KEY = "lego_processes_test_key"
PID = re.compile(r'^lego_api_process\{pid="(\d+)"\} 1\.0$', re.M)
IMAGES = re.compile(r"^lego_predict_images_total (\S+)$", re.M)


def per_process_images(base: str, tries: int = 60) -> dict[str, float]:
    """Images each API process has classified, by its pid, from /metrics asked on
    fresh connections (each process answers with its own counters)."""
    seen: dict[str, float] = {}
    for _ in range(tries):
        text = httpx.get(f"{base}/metrics", timeout=30).text
        seen[PID.search(text).group(1)] = float(IMAGES.search(text).group(1))
    return seen


@needs_lego(*JOURNEY_NEEDS)
def test_two_api_processes_share_the_catalog_and_serve_the_same_predictions(
    tmp_path, mnist_small, digits, trained_lenets
):
    from lego_core import load_exported

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(
        var_dir=tmp_path,
        storage_dir=tmp_path / "artifacts",
        bootstrap_api_key=KEY,
        device="cpu",
        runner_poll_s=0.1,
        min_free_disk_bytes=1 << 20,
    )
    proc = Proc(
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"],
        env,
        tmp_path / "api.log",
    )
    try:
        deadline = time.monotonic() + 300
        while proc.output().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, proc.tail()
            assert proc.p.poll() is None, proc.tail()
            time.sleep(0.3)
        log = proc.output()
        assert log.count("Running upgrade  -> 0001") == 1  # migrated once, before the processes
        assert "API processes: 2" in log

        client = httpx.Client(base_url=base, timeout=120)
        http = Http(client, {"Authorization": f"Bearer {KEY}"})
        r = http.post(
            "/api/v1/datasets",
            data={"name": "mnist-small"},
            files={"archive": ("mnist-small.tar.gz", mnist_small)},
        )
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        ids = []
        for weights, name, classes in (
            (trained_lenets.low, "low", list("01234")),
            (trained_lenets.high, "high", list("56789")),
        ):
            r = register(http, weights, name, classes, ds)
            assert r.status_code == 201, r.text
            ids.append((r.json()["id"], r.json()["locate_job_id"], classes))
        for _, job_id, _ in ids:
            job = http.wait_job(job_id)
            assert job["status"] == "succeeded" and job["attempts"] == 1, job
        body = {
            "name": "digits",
            "source_classes": [{"model_id": m, "classes": c[:2]} for m, _, c in ids],
        }
        r = http.post("/api/v1/assemblies", json=body)
        assert r.status_code == 202, r.text
        asm = http.wait_assembly(r.json()["id"])
        assert asm["status"] == "succeeded", asm
        r = http.get(f"/api/v1/assemblies/{asm['id']}/download")
        assert r.status_code == 200
        (tmp_path / "served.pt").write_bytes(r.content)
        clf = load_exported(tmp_path / "served.pt")

        from app.predict import decode_image

        wanted = {}
        for d in "0156":
            x = decode_image(digits[d], clf.spec, 25_000_000)[None]
            with torch.inference_mode():
                wanted[d] = torch.softmax(clf(x).float(), 1)[0]

        def ask(d: str) -> tuple[str, list[dict]]:
            # a connection of its own, so the kernel hands it to either process
            with httpx.Client(base_url=base, timeout=120) as c:
                r = c.post(
                    f"/api/v1/assemblies/{asm['id']}/predict",
                    headers={"Authorization": f"Bearer {KEY}"},
                    files={"images": ("digit.png", digits[d], "image/png")},
                    params={"top_k": 4},
                )
            assert r.status_code == 200, r.text
            return d, r.json()["predictions"][0]

        sent = 0
        for _ in range(5):  # until both processes have answered some
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(ask, list("0156") * 8))
            sent += len(answers)
            for d, top in answers:
                for entry in top:
                    i = clf.class_names.index(entry["class"])
                    assert abs(entry["probability"] - float(wanted[d][i])) < 1e-5, (d, entry)
            counts = per_process_images(base)
            if len([n for n in counts.values() if n > 0]) >= 2:
                break
        assert len(counts) == 2, counts  # two API processes answered /metrics
        assert all(n > 0 for n in counts.values()), counts  # both classified images
        assert sum(counts.values()) == sent  # each request classified once, by one of them
        client.close()
    finally:
        proc.stop()
