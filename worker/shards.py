"""A locate job split across Celery workers (full stack, large datasets).

The job's own worker (the parent, which holds the job row and its heartbeat) cuts the
work into shards (lego_core.shards), sends one `lego.locate_shard` task per shard and
then works through the shards itself as well, so the job finishes however many
workers there are (also with one worker of concurrency 1: no task waits for a slot
that it holds itself). Two phases: selection shards, merged into the selected
samples; then contribution shards, added. The masks are computed once, by the parent.

Every shard has a result file and a claim file under the artifact storage
(work/shards/job-<id>/): whoever takes a shard creates its claim file exclusively,
keeps touching it while it computes, writes the result atomically and removes the
claim. A claim older than `LEGO_JOB_STALE_S` belongs to a worker that died: the
next one removes it and does the shard again. A shard done twice writes the same
file again (same inputs, same bytes), and is counted once because results are read
by shard index. Results are tensors read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("lego.shards")

SHARD_TASK = "lego.locate_shard"
WAIT_S = 0.2


def shard_dir(storage, job_id: int) -> Path:
    return storage.work_dir(f"shards/job-{int(job_id)}")


def result_path(directory: Path, phase: str, k: int) -> Path:
    return directory / f"{phase}-{int(k)}.pt"


def _claim(directory: Path, phase: str, k: int, stale_s: float) -> Path | None:
    """The claim file of shard k, created by this process; None if another holds it."""
    claim = directory / f"{phase}-{int(k)}.claim"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                age = time.time() - claim.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if age < stale_s:
                return None
            log.warning("shard %s-%s: claim %.0f s old, taken over", phase, k, age)
            with contextlib.suppress(FileNotFoundError):
                claim.unlink()
            continue
        os.close(fd)
        return claim
    return None


class _Touch:
    """Keeps a claim fresh while its shard is computed."""

    def __init__(self, claim: Path, every_s: float) -> None:
        self.claim, self.every_s = claim, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-claim", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError):
                os.utime(self.claim)

    def __enter__(self) -> _Touch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def do_shard(
    directory: Path,
    phase: str,
    k: int,
    compute: Callable[[], dict],
    stale_s: float,
    touch_s: float,
) -> bool:
    """Computes shard k unless its result exists or another process holds it; True if
    this call computed it."""
    from lego_core.shards import save_shard

    target = result_path(directory, phase, k)
    if target.exists():
        return False
    claim = _claim(directory, phase, k, stale_s)
    if claim is None:
        return False
    try:
        if target.exists():
            return False
        with _Touch(claim, touch_s):
            save_shard(target, compute())
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            claim.unlink()


def run_phase(
    ctx,
    directory: Path,
    phase: str,
    count: int,
    compute: Callable[[int], dict],
    send: Callable[[int], None],
    progress: Callable[[float, str], None],
) -> list[dict]:
    """Sends a task per missing shard, works through the shards here too, waits for
    those that others hold; returns the results by shard index."""
    from lego_core.shards import load_shard

    settings = ctx.env.settings
    for k in range(count):
        if not result_path(directory, phase, k).exists():
            send(k)
    while True:
        missing = [k for k in range(count) if not result_path(directory, phase, k).exists()]
        progress((count - len(missing)) / count, f"{phase} shards: {count - len(missing)}/{count}")
        if not missing:
            break
        worked = False
        for k in missing:
            worked |= do_shard(
                directory,
                phase,
                k,
                lambda k=k: compute(k),
                settings.job_stale_s,
                settings.job_heartbeat_s,
            )
        if not worked:
            time.sleep(WAIT_S)
    return [load_shard(result_path(directory, phase, k)) for k in range(count)]


# --------------------------------------------------------------------------- the work


def shard_count(settings, rows: int) -> int:
    """Shards of a locate job over `rows` rows: 1 without a broker or with
    LEGO_LOCATE_SHARD_ROWS=0."""
    if settings.embedded_broker or settings.locate_shard_rows <= 0:
        return 1
    return max(1, -(-rows // settings.locate_shard_rows))


class ShardWork:
    """What the parent and the shard tasks of one locate job compute."""

    def __init__(self, model, data, samples_per_class, count: int, device: str) -> None:
        from lego_core import DEFAULT_SAMPLES_PER_CLASS
        from lego_core.shards import selection_batch, selection_ranges

        self.model, self.data, self.device, self.count = model, data, device, count
        self.n = int(samples_per_class or DEFAULT_SAMPLES_PER_CLASS)
        self.ranges = selection_ranges(len(data), count, selection_batch(model))

    @classmethod
    def for_job(cls, env, payload: dict, count: int, device: str) -> ShardWork:
        from types import SimpleNamespace

        from app import adapters
        from app.catalog import Dataset, Model
        from lego_core.errors import LegoError
        from worker.tasks import located_data

        with env.catalog.session() as s:
            m, ds = s.get(Model, payload["model_id"]), s.get(Dataset, payload["dataset_id"])
            if m is None or ds is None:
                raise LegoError("the model or dataset of this job was deleted")
            s.expunge(m)
            s.expunge(ds)
        model = adapters.load_model(env.storage, m)
        data = located_data(SimpleNamespace(storage=env.storage, env=env), m, ds, model.spec)
        return cls(model, data, payload.get("samples_per_class"), count, device)

    def plan(self, directory: Path):
        """The contribution shards, once the merged selection is stored."""
        from lego_core.locate import shard_plan
        from lego_core.shards import load_shard

        selected = {int(c): v for c, v in load_shard(directory / "selected.pt").items()}
        return shard_plan(selected, self.count, self.model)

    def compute(self, phase: str, k: int, plan=None) -> dict:
        from lego_core.locate import contribution_sums
        from lego_core.shards import candidates_state, select_shard

        if phase == "select":
            a, b = self.ranges[k]
            return candidates_state(select_shard(self.model, self.data, a, b, self.n, self.device))
        idx, lab = plan[k]
        return contribution_sums(self.model, self.data, idx, lab, device=self.device)


def run_shard_task(env, job_id: int, phase: str, k: int, count: int) -> str:
    """A `lego.locate_shard` task: shard k of the job's phase, unless done or held."""
    from app.catalog import Job
    from worker.runtime import resolve_device

    directory = env.storage.work / "shards" / f"job-{int(job_id)}"
    with env.catalog.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running" or job.kind != "locate":
            return "skipped"
        payload = dict(job.payload or {})
    if not directory.is_dir() or result_path(directory, phase, k).exists():
        return "skipped"  # finished, or done already
    work = ShardWork.for_job(env, payload, count, resolve_device(env.settings.device))
    plan = None
    if phase == "sums":
        if not (directory / "selected.pt").exists():
            return "skipped"
        plan = work.plan(directory)
    s = env.settings
    done = do_shard(
        directory, phase, k, lambda: work.compute(phase, k, plan), s.job_stale_s, s.job_heartbeat_s
    )
    return "computed" if done else "held"


def sharded_locator(ctx, model, data, count: int, progress):
    """The parent's side of a sharded locate: the selection and contribution shards
    go to the workers and their sums are added here; returns a lego_core `Locator`
    over them, whose every call is one mask pass (the sums do not depend on the
    thresholds) giving Components equal to one pass of `locate`. `progress` gets
    0..1 over the shards."""
    from lego_core import Locator

    held = _sharded_sums(ctx, model, data, count, progress)
    return Locator.from_sums(model, data, held["selected"], held["sums"], held["n"])


def _sharded_sums(ctx, model, data, count: int, progress) -> dict:
    """Selection and contribution sums computed by shards over the workers:
    {"selected", "sums", "n"}."""
    import shutil

    from lego_core.contributions import add_sums
    from lego_core.shards import candidates_from_state, merge_selections, save_shard
    from worker.celery_app import client, job_queue

    def band(lo: float, hi: float):
        return lambda f, m="": progress(lo + (hi - lo) * f, m)

    settings = ctx.env.settings
    directory = shard_dir(ctx.storage, ctx.job_id)
    work = ShardWork(model, data, ctx.payload.get("samples_per_class"), count, ctx.device)

    def sender(phase: str) -> Callable[[int], None]:
        def send(k: int) -> None:
            client(settings.broker_url, settings.cpu_queue).send_task(
                SHARD_TASK, args=[ctx.job_id, phase, k, count], queue=job_queue(settings)
            )

        return send

    parts = run_phase(
        ctx,
        directory,
        "select",
        len(work.ranges),
        lambda k: work.compute("select", k),
        sender("select"),
        band(0.0, 0.45),
    )
    selected = merge_selections([candidates_from_state(p) for p in parts], work.n)
    save_shard(directory / "selected.pt", {str(c): v for c, v in selected.items()})
    plan = work.plan(directory)
    sums: dict = {}
    for part in run_phase(
        ctx,
        directory,
        "sums",
        len(plan),
        lambda k: work.compute("sums", k, plan),
        sender("sums"),
        band(0.45, 0.95),
    ):
        sums = add_sums(sums, part)
    shutil.rmtree(directory, ignore_errors=True)
    return {"selected": selected, "sums": sums, "n": work.n}
