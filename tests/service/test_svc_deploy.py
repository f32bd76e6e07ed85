"""Scale-out plumbing: the compose file and Dockerfile (no Docker engine here: parsed and
checked against the entry points the tests run), and job routing between the CPU and
the GPU queue with real Redis, PostgreSQL and `lego worker` processes."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from service_helpers import Proc, fresh_pg_database, fresh_redis_db, service_env, wait_job

from app.cli import build_parser, worker_queues
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def compose_env(service: dict) -> dict:
    """A service's environment with ${VAR:-default} replaced by the default."""
    env = service.get("environment") or {}
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def settings_of(service: dict) -> Settings:
    return Settings(**{k[5:].lower(): v for k, v in compose_env(service).items()})


def test_compose_gpu_profile_worker_reserves_a_gpu_and_consumes_the_gpu_queue():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    gpu, cpu, api = services["gpu-worker"], services["worker"], services["api"]
    assert gpu["profiles"] == ["gpu"]
    assert all("profiles" not in services[s] for s in ("api", "worker", "postgres", "redis"))
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH"] == "gpu" and gpu["image"] != cpu["image"]

    # The commands parse with the `lego` CLI the tests start, and consume the queues
    # that the API's settings route to.
    api_settings, cpu_settings, gpu_settings = map(settings_of, (api, cpu, gpu))
    parser = build_parser()
    for service in (api, cpu, gpu):
        parser.parse_args(service["command"])
    gpu_args, cpu_args = parser.parse_args(gpu["command"]), parser.parse_args(cpu["command"])
    assert gpu_args.command == cpu_args.command == "worker"
    assert worker_queues(gpu_args, gpu_settings) == api_settings.gpu_queue
    assert worker_queues(cpu_args, cpu_settings) == api_settings.cpu_queue
    assert api_settings.gpu_queue != api_settings.cpu_queue
    assert gpu_settings.device == "cuda" and cpu_settings.device == "cpu"
    # Everyone shares the catalog, the broker and the artifact volume.
    for key in ("database_url", "broker_url", "storage_dir"):
        assert (
            getattr(gpu_settings, key) == getattr(cpu_settings, key) == getattr(api_settings, key)
        )
    assert gpu["volumes"] == cpu["volumes"]


def test_dockerfile_builds_cpu_or_cuda_torch_at_the_pinned_version():
    text = (REPO / "Dockerfile").read_text()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    first_from = text.index("\nFROM ")
    assert re.search(r"^ARG TORCH=cpu$", text[:first_from], re.M)
    stages = {name: parent for parent, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)}
    assert stages["runtime"] == "torch-${TORCH}"
    assert stages["torch-cpu"] == stages["torch-gpu"] == "base"
    body = {
        name: text.split(f" AS {name}\n", 1)[1].split("\nFROM ", 1)[0]
        for name in ("torch-cpu", "torch-gpu")
    }
    for name, lines in body.items():
        assert f"pip install {torch_pin} " in lines, name
    assert "download.pytorch.org/whl/cpu" in body["torch-cpu"]
    assert "--index-url" not in body["torch-gpu"]  # PyPI's wheels carry CUDA
    assert text.rstrip().endswith('CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]')


@pytest.mark.fullstack
@pytest.mark.slow
def test_jobs_go_to_the_gpu_queue_while_a_gpu_worker_is_up(tmp_path):
    """Real Redis, PostgreSQL and `lego worker` processes (on the CPU here, one of them
    consuming the GPU queue as a GPU worker does)."""
    from app.catalog import Job
    from worker.celery_app import client, gpu_worker_up, job_queue, send
    from worker.runtime import Env, create_job

    with fresh_pg_database() as pg_url, fresh_redis_db() as redis_url:
        common = dict(
            database_url=pg_url,
            broker_url=redis_url,
            storage_dir=tmp_path / "artifacts",
            var_dir=tmp_path,
            job_heartbeat_s=0.5,
            job_stale_s=2,
            reaper_interval_s=0.5,
            device="cpu",
            gpu_queue="test-gpu",
            gpu_probe_ttl_s=0.2,
        )
        settings = Settings(**common)
        env = Env.from_settings(settings)
        procs: list[Proc] = []

        def start(name: str, *args: str) -> Proc:
            p = Proc(["worker", "--pool", "solo", *args], service_env(**common), tmp_path / name)
            procs.append(p)
            p.wait_for("ready.", timeout=120)
            return p

        def run(send_job) -> str:
            """Runs a job of an unknown kind (it fails at once); returns its worker."""
            with env.catalog.session() as s:
                job_id = create_job(s, "nobody", "no-such-kind", {}, 2).id
            send_job(job_id)
            wait_job(lambda: {"status": row(job_id).status}, timeout=120)
            assert row(job_id).error == "unknown job kind 'no-such-kind'"
            return row(job_id).worker

        def row(job_id):
            with env.catalog.session() as s:
                return s.get(Job, job_id)

        def until(up: bool) -> None:
            deadline = time.monotonic() + 60
            while gpu_worker_up(settings) != up:
                assert time.monotonic() < deadline, (
                    f"GPU worker never seen {'up' if up else 'gone'}"
                )
                time.sleep(0.1)

        try:
            cpu = start("cpu.log")
            assert job_queue(settings) == "lego"
            assert run(lambda j: send(settings, j)).endswith(f":{cpu.p.pid}")

            gpu = start("gpu.log", "--queues", "test-gpu")
            until(True)
            assert job_queue(settings) == "test-gpu"
            assert run(lambda j: send(settings, j)).endswith(f":{gpu.p.pid}")

            # A message left on the GPU queue when its worker went away is sent again
            # (by the CPU worker's reaper, once the job waited job_stale_s) and runs there.
            gpu.stop()
            until(False)
            assert job_queue(settings) == "lego"
            publisher = client(settings.broker_url, settings.cpu_queue)
            stranded = run(
                lambda j: publisher.send_task("lego.run_job", args=[j], queue="test-gpu")
            )
            assert stranded.endswith(f":{cpu.p.pid}")
        finally:
            for p in procs:
                p.stop()
            env.catalog.dispose()
