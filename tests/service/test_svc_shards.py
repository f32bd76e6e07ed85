"""A locate job split across Celery workers (worker/shards.py): real `lego serve`, two
real `lego worker` processes, PostgreSQL and Redis; the components equal one pass of
lego_core.locate_checked in this process, bit for bit. Plus the claim files' rules."""

from __future__ import annotations

import os
import time

import httpx
import pytest
import torch
from service_helpers import (
    JOURNEY_NEEDS,
    Http,
    Proc,
    free_port,
    fresh_pg_database,
    fresh_redis_db,
    make_tar_gz,
    needs_lego,
    pick_members,
    register,
    service_env,
)

from worker.shards import do_shard, result_path

KEY = "lego_shards_test_key"


def test_a_shard_is_done_once_and_a_dead_workers_claim_is_taken_over(tmp_path):
    from lego_core.shards import load_shard

    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.tensor([len(calls)])}

    assert do_shard(tmp_path, "select", 0, compute, stale_s=60, touch_s=1)
    assert not do_shard(tmp_path, "select", 0, compute, stale_s=60, touch_s=1)  # done already
    assert load_shard(result_path(tmp_path, "select", 0))["x"].tolist() == [1]
    assert not list(tmp_path.glob("*.claim"))

    claim = tmp_path / "select-1.claim"
    claim.touch()  # another worker holds shard 1
    assert not do_shard(tmp_path, "select", 1, compute, stale_s=60, touch_s=1)
    old = time.time() - 120  # ... and died two minutes ago
    os.utime(claim, (old, old))
    assert do_shard(tmp_path, "select", 1, compute, stale_s=60, touch_s=1)
    assert len(calls) == 2 and not claim.exists()


@pytest.mark.fullstack
@pytest.mark.slow
@needs_lego(*JOURNEY_NEEDS)
def test_locate_split_over_two_workers_equals_one_pass(tmp_path, shared_data, trained_lenets):
    from app.catalog import ComponentSet
    from app.settings import Settings
    from lego_core import (
        MNIST_SPEC,
        Components,
        load_image_folder,
        load_source_model,
        locate_checked,
    )
    from worker.runtime import Env

    # 600 images of the model's five digits: three selection batches of 256 rows.
    members = pick_members(shared_data / "mnist-test.tar.gz", 120, classes=set("01234"))
    archive = tmp_path / "digits.tar.gz"
    archive.write_bytes(make_tar_gz(members))

    with fresh_pg_database() as pg_url, fresh_redis_db() as redis_url:
        common = dict(
            database_url=pg_url,
            broker_url=redis_url,
            storage_dir=tmp_path / "artifacts",
            var_dir=tmp_path,
            job_heartbeat_s=0.5,
            job_stale_s=10,
            reaper_interval_s=0.5,
            device="cpu",
            locate_shard_rows=200,  # three shards
            min_free_disk_bytes=1 << 20,
        )
        port = free_port()
        procs = [
            Proc(
                ["serve", "--host", "127.0.0.1", "--port", str(port)],
                service_env(bootstrap_api_key=KEY, **common),
                tmp_path / "api.log",
            )
        ]
        try:
            procs[0].wait_for("Uvicorn running", timeout=300)
            for name in ("w1", "w2"):
                procs.append(
                    Proc(["worker", "--concurrency", "1"], service_env(**common), tmp_path / name)
                )
            for p in procs[1:]:
                p.wait_for("ready.", timeout=300)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            http = Http(client, {"Authorization": f"Bearer {KEY}"})
            r = http.post(
                "/api/v1/datasets",
                data={"name": "digits"},
                files={"archive": ("digits.tar.gz", archive.read_bytes())},
            )
            assert r.status_code == 201, r.text
            ds = r.json()["id"]
            r = register(http, trained_lenets.low, "lenet-0-4", list("01234"))
            assert r.status_code == 201, r.text
            model_id = r.json()["id"]
            r = http.post(
                f"/api/v1/models/{model_id}/locate",
                json={"dataset_id": ds, "samples_per_class": 60},  # 300 samples: 3 batches
            )
            assert r.status_code == 202, r.text
            job = http.wait_job(r.json()["job_id"])
            assert job["status"] == "succeeded", job
            logs = "".join(p.output() for p in procs[1:])
            assert "lego.locate_shard" in logs  # the shard tasks went through the broker

            env = Env.from_settings(Settings(**common))
            with env.catalog.session() as s:
                sha = s.query(ComponentSet).filter_by(model_id=model_id).one().artifact_sha256
            sharded = Components.load(env.storage.require(sha))
            assert not (env.storage.work / "shards" / f"job-{job['id']}").exists()
            env.catalog.dispose()
        finally:
            for p in procs:
                p.stop()

    model = load_source_model(trained_lenets.low, "lenet", list("01234"), MNIST_SPEC)
    data = load_image_folder(archive, MNIST_SPEC, classes=list("01234"))
    # The service's locate is the checked one (lego_core.fidelity): same masks and
    # the same check report, from sums computed once by the shards.
    one = locate_checked(model, data, samples_per_class=60)
    assert sharded.parameters["check"]["sets"]
    assert sharded.selected.keys() == one.selected.keys()
    for c in one.masks:
        assert torch.equal(sharded.selected[c], one.selected[c]), c
        for layer, mask in one.masks[c].items():
            assert torch.equal(sharded.masks[c][layer], mask), (c, layer)
    assert sharded.parameters == one.parameters
