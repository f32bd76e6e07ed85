"""All service settings, in one place: environment variables with the prefix `LEGO_`.

`LEGO_DATABASE_URL=postgresql+psycopg://...` sets `database_url`, and so on. Empty
`LEGO_DATABASE_URL` / `LEGO_BROKER_URL` select the embedded default: a SQLite
catalog under `LEGO_VAR_DIR` and an in-process job runner instead of Celery.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lego_core.assemble import DEFAULT_CALIBRATION_PER_CLASS

MiB = 1024 * 1024


def default_var_dir() -> Path:
    """`var/` of the checkout this code runs from (so that `lego ...` run from any folder
    uses the catalog `make run` made); `./var` for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root / "var" if (root / "pyproject.toml").is_file() else Path("var")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEGO_", extra="ignore")

    # Where things live.
    var_dir: Path = Field(
        default_factory=default_var_dir,
        description="Base directory of the embedded default (default: var/ of the checkout).",
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite in var_dir.")
    broker_url: str = Field("", description="Celery broker (redis://...); empty: embedded runner.")
    result_backend: str = Field("", description="Celery result backend; empty: none needed.")
    storage_dir: Path | None = Field(None, description="Artifact directory; shared by workers.")
    data_dir: Path | None = Field(
        None, description="Server-side datasets that POST /datasets may name with `path`."
    )

    # API.
    host: str = "127.0.0.1"
    port: int = 8000
    bootstrap_api_key: str = Field("", description="Key created at start (owner: bootstrap).")
    bootstrap_owner: str = "admin"
    api_processes: int = Field(
        1,
        ge=1,
        description="API processes `lego serve` runs (uvicorn workers on one port), each with "
        "its own model cache and micro-batching; more use more cores for predict.",
    )

    # Upload and input limits.
    max_model_bytes: int = 512 * MiB
    max_dataset_bytes: int = 2048 * MiB
    max_request_bytes: int = 64 * MiB
    archive_max_members: int = 200_000
    archive_max_member_bytes: int = 32 * MiB
    archive_max_total_bytes: int = 2048 * MiB
    archive_max_ratio: float = 100.0
    max_image_pixels: int = 25_000_000
    max_predict_images: int = 256
    min_free_disk_bytes: int = Field(
        256 * MiB, description="/readyz reports not ready when the artifact disk has less free."
    )

    # Jobs.
    job_time_limit_s: int = 6 * 3600
    job_max_attempts: int = 2
    job_heartbeat_s: float = 5.0
    job_stale_s: float = 60.0
    job_retry_delay_s: float = 5.0
    reaper_interval_s: float = 10.0
    orphan_grace_s: float = Field(
        3600.0,
        description="Artifacts no row references and temp files older than this are deleted "
        "by the reaper (what a job that died between storing and recording left behind).",
    )
    runner_poll_s: float = 1.0
    cpu_queue: str = Field("lego", description="Celery queue of the CPU workers.")
    gpu_queue: str = Field(
        "lego-gpu",
        description="Celery queue of the GPU workers: jobs go there while a worker consumes it.",
    )
    gpu_probe_ttl_s: float = Field(
        15.0, description="How long the API reuses its look at whether a GPU worker is up."
    )
    worker_queues: str = Field("", description="Queues `lego worker` consumes; empty: cpu_queue.")
    locate_shard_rows: int = Field(
        50_000,
        description="Full stack: a locate job over more dataset rows than this is split into "
        "shard tasks of about this many rows over the workers (0: never split).",
    )
    worker_concurrency: int = 1
    device: str = Field(
        "auto", description="auto (cuda when present), cpu or cuda: jobs and predict run there."
    )
    debug_job_delay_s: float = Field(
        0.0, description="Testing only: a job sleeps this long (heartbeating) before its work."
    )

    calibration_per_class: int = Field(
        DEFAULT_CALIBRATION_PER_CLASS,
        ge=1,
        description="Images per class of each part's locating dataset that an assembly uses "
        "to fit its scaling and decision stage.",
    )

    # Predict.
    predict_cache_size: int = 4
    predict_batch_size: int = 64

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'lego.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.var_dir / "artifacts").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
