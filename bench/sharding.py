"""Figure 7: a locate job split across Celery workers, 1 worker process against 2, and
the cost model that extends the two points to N workers on an ImageNet-size job.

The full stack as docker compose runs it: `lego serve` and `lego worker` processes
(Celery, prefork, concurrency 1 each) over a fresh PostgreSQL database and a spare
Redis database, as figure 5 starts them. The job: plain_cnn (random weights, seed 0)
located on the 10,000 CIFAR-10 test images with LEGO_LOCATE_SHARD_ROWS=2500, so
both phases (selection, contributions) have 4 shards. Each round registers the same
weights under a new name (a locate of an already located model is reused, not run)
and times POST /models/{id}/locate -> succeeded, once with one worker process and
once with two (the second started before and stopped after its run), the order
alternating between rounds. Every job's masks and selected samples are compared
with one pass of `lego_core.locate` in this process.

The cost model (bench/README.md explains it):

    T(N) = F + sum over phases p of ceil(S_p / N) * (W_p / S_p + o [N > 1])

W_p: the phase's compute (one-pass selection and contribution times, measured here);
S_p: its shards; F: what the job does once (dispatch, loading the model and data in
the job's own worker, masks, component statistics, storing), fitted from the
one-worker time; o: what a shard done by another worker costs beyond its compute
(the task message, loading model and dataset there, writing and reading its
result), measured directly here (loading model and dataset) and also fitted from the
two-worker time: the model is checked by how close the two are.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Config, FigureResult, Row, median, not_measured, spread

SHARD_ROWS = 2500
IMAGENET_ROWS = 1_281_167
IMAGENET_CLASSES = 1000
IMAGENET_SHARD_ROWS = 50_000  # LEGO_LOCATE_SHARD_ROWS' default
PREDICT_WORKERS = (1, 2, 4, 8, 16, 26, 32, 64)
NAME = "locate job split over Celery workers (plain_cnn, CIFAR-10 test, 10,000 images, 4+4 shards)"


def phases(shards: tuple[int, int], work: tuple[float, float], n: int, o: float) -> float:
    """The sharded part of T(N): each phase's makespan over n workers, one after the
    other (a barrier between them: the contribution plan needs the merged selection)."""
    total = 0.0
    for s, w in zip(shards, work, strict=True):
        total += math.ceil(s / n) * (w / s + (o if n > 1 else 0.0))
    return total


def predict_seconds(fixed: float, shards, work, n: int, o: float) -> float:
    return fixed + phases(shards, work, n, o)


# --------------------------------------------------------------------------- in-process


def direct_pass(model, data) -> dict:
    """One pass of lego_core.locate in this process (the components every job must
    equal) and the component statistics' time, which the job adds."""
    from lego_core import component_stats, locate

    t = time.perf_counter()
    comps = locate(model, data)
    one_pass = time.perf_counter() - t
    t = time.perf_counter()
    comps.stats = component_stats(model, comps)
    stats_s = time.perf_counter() - t
    return {"components": comps, "one_pass_s": one_pass, "stats_s": stats_s}


def phase_seconds(model, data) -> tuple[float, float, int]:
    """The two phases' compute, as one pass does them in this process: selection
    (a forward pass over every row) and the contribution pass over the selected
    samples; and how many samples that is. Measured in every round, next to the jobs,
    so that it sees the same load."""
    from lego_core.locate import contribution_sums, select_samples, shard_plan

    t = time.perf_counter()
    selected = select_samples(model, data)
    select_s = time.perf_counter() - t
    (idx, lab), *_ = shard_plan(selected, 1, model)
    t = time.perf_counter()
    contribution_sums(model, data, idx, lab)
    return select_s, time.perf_counter() - t, int(len(idx))


def shard_load_seconds(weights: Path, archive: Path, classes: list[str], spec) -> float:
    """What a shard task loads before it computes: the model and the decoded dataset
    (from the decode cache, which the job's first load filled)."""
    from lego_core import load_image_folder, load_source_model

    t = time.perf_counter()
    load_source_model(weights, "plain_cnn", classes, spec)
    load_image_folder(archive, spec, classes=classes, progress=False)
    return time.perf_counter() - t


def resnet50_costs(cfg: Config, cifar_image: torch.Tensor) -> dict:
    """ResNet-50 at 224x224 (1000 classes, random weights) on one core here: seconds a
    forward pass takes per image (batch 8), the contribution pass per selected sample
    (4 samples), and decoding plus resizing one ImageNet-size JPEG (500x375) to 224."""
    from PIL import Image

    from lego_core import IMAGENET_SPEC, build_model, source_from_module
    from lego_core.data import ImageFolderData
    from lego_core.locate import contribution_sums

    torch.manual_seed(0)
    names = [str(i) for i in range(IMAGENET_CLASSES)]
    module = build_model("resnet50", IMAGENET_CLASSES, IMAGENET_SPEC).eval()
    model = source_from_module(module, IMAGENET_SPEC, names, "resnet50", "resnet50")
    x = torch.rand(8, 3, 224, 224)
    with torch.inference_mode():
        module(x[:2])
        t = time.perf_counter()
        module(x)
        forward = (time.perf_counter() - t) / len(x)
    samples = 4
    images = (torch.rand(samples, 3, 224, 224) * 255).to(torch.uint8)
    data = ImageFolderData(images, torch.arange(samples) * 7, names)
    idx, lab = torch.arange(samples), torch.arange(samples) * 7
    t = time.perf_counter()
    contribution_sums(model, data, idx, lab)
    contrib = (time.perf_counter() - t) / samples
    # A photo-like 500x375 JPEG (an upscaled CIFAR-10 image; ImageNet's average size)
    # rather than noise, which JPEG cannot compress and would decode slower.
    photo = Image.fromarray(cifar_image.permute(1, 2, 0).numpy()).resize((500, 375))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    blob = buf.getvalue()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        img = img.resize((224, 224), Image.Resampling.BILINEAR)
        img.tobytes()
    decode = (time.perf_counter() - t) / reps
    cfg.log(
        f"[7] ResNet-50 224x224: forward {forward * 1000:.0f} ms/image, contributions "
        f"{contrib * 1000:.0f} ms/sample, JPEG decode+resize {decode * 1000:.1f} ms/image"
    )
    return {
        "forward_s": forward,
        "contrib_s": contrib,
        "decode_s": decode,
        "jpeg_bytes": len(blob),
        "layers": len(model.graph.layers()),
    }


# --------------------------------------------------------------------------- the stack


def run(cfg: Config) -> FigureResult:
    res = FigureResult()
    try:
        import psycopg  # noqa: F401
        import redis  # noqa: F401

        from app.main import create_app  # noqa: F401
    except ImportError as exc:
        res.rows.append(not_measured("7", NAME, "report", f"service missing: {exc}"))
        return res
    root = Path(tempfile.mkdtemp(prefix="lego-bench-shards-"))
    try:
        _run(cfg, root, res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res


def _run(cfg: Config, root: Path, res: FigureResult) -> None:
    from bench.service import (
        CIFAR_SPEC,
        Api,
        Proc,
        free_port,
        fresh_pg_database,
        save_random_weights,
        service_env,
        spare_redis_db,
    )
    from lego_core import (
        Components,
        InputSpec,
        load_image_folder,
        load_source_model,
        shared_data_dir,
    )

    archive = shared_data_dir() / "cifar10-test.tar.gz"
    spec = InputSpec.from_dict(CIFAR_SPEC)
    weights = save_random_weights("plain_cnn", CIFAR_SPEC, 0, root / "plain_cnn.pt")
    data = load_image_folder(archive, spec, progress=False)
    classes = list(data.class_names)
    model = load_source_model(weights, "plain_cnn", classes, spec)
    cfg.log("[7] one pass of lego_core.locate in this process")
    direct = direct_pass(model, data)
    one = direct.pop("components")
    reps = 1 if cfg.quick else 2
    times: dict[str, list[float]] = {"1": [], "2": []}
    work_rounds: list[tuple[float, float, int]] = []
    load_rounds: list[float] = []
    identical: list[bool] = []
    procs: list[Proc] = []
    try:
        with fresh_pg_database() as pg_url, spare_redis_db() as redis_url:
            env = service_env(
                root,
                database_url=pg_url,
                broker_url=redis_url,
                locate_shard_rows=SHARD_ROWS,
                job_heartbeat_s=1.0,
            )
            port = free_port()
            cfg.log("[7] starting lego serve + 1 lego worker (PostgreSQL, Redis)")
            api_proc = Proc(
                ["serve", "--host", "127.0.0.1", "--port", str(port)], env, root / "api.log"
            )
            procs.append(api_proc)
            api_proc.wait_for("Uvicorn running", timeout=300)
            procs.append(Proc(["worker", "--concurrency", "1"], env, root / "worker-1.log"))
            procs[-1].wait_for("ready.", timeout=300)
            api = Api(f"http://127.0.0.1:{port}")
            try:
                api.wait_ready()
                dataset_id = _upload(api, archive)
                counter = iter(range(1000))

                def locate_once(workers: int) -> float:
                    extra = None
                    if workers == 2:
                        extra = Proc(["worker", "--concurrency", "1"], env, root / "worker-2.log")
                        procs.append(extra)
                        extra.wait_for("ready.", timeout=300)
                    try:
                        model_id = _register(api, weights, f"plain-{next(counter)}", classes)
                        t = time.perf_counter()
                        r = api.check(
                            api.http.post(
                                f"/api/v1/models/{model_id}/locate",
                                json={"dataset_id": dataset_id},
                            ),
                            202,
                        )
                        job = api.wait(f"/api/v1/jobs/{r['job_id']}", poll=0.05)
                        elapsed = time.perf_counter() - t
                    finally:
                        if extra is not None:
                            extra.stop()
                            procs.remove(extra)
                    if job["status"] != "succeeded":
                        raise RuntimeError(f"locate job failed: {job.get('error')}")
                    identical.append(_same(one, _components(env, model_id, Components)))
                    return elapsed

                cfg.log("[7] warm-up: a locate job (fills the worker's decode cache)")
                locate_once(1)
                identical.clear()
                for r in range(reps):
                    for n in ("1", "2") if r % 2 == 0 else ("2", "1"):
                        cfg.log(f"[7] round {r + 1}/{reps}: {n} worker process(es)")
                        times[n].append(locate_once(int(n)))
                    cfg.log(f"[7] round {r + 1}/{reps}: the phases and a shard's loading here")
                    work_rounds.append(phase_seconds(model, data))
                    load_rounds.append(shard_load_seconds(weights, archive, classes, spec))
            finally:
                api.close()
    except Exception as exc:  # noqa: BLE001 - report, do not lose the other figures
        reason = f"{type(exc).__name__}: {exc}"[:300]
        cfg.log(f"[7] failed: {reason}")
        for p in procs:
            cfg.log(f"--- {p.log.name}\n{p.tail()}")
        res.rows.append(not_measured("7", NAME, "report", reason))
        return
    finally:
        for p in reversed(procs):
            p.stop()
    r50 = resnet50_costs(cfg, data.images[0])
    direct["layers"] = len(model.graph.layers())
    direct["select_s"] = median([w[0] for w in work_rounds])
    direct["contrib_s"] = median([w[1] for w in work_rounds])
    direct["samples"] = work_rounds[0][2]
    direct["phase_rounds"] = work_rounds
    direct["shard_load_rounds"] = load_rounds
    _report(res, direct, median(load_rounds), times, identical, r50, len(data), len(classes))


def _upload(api, archive: Path) -> int:
    with open(archive, "rb") as f:
        ds = api.check(
            api.http.post(
                "/api/v1/datasets",
                data={"name": "cifar10-test"},
                files={"archive": (archive.name, f, "application/gzip")},
            ),
            201,
        )
    return ds["id"]


def _register(api, weights: Path, name: str, classes: list[str]) -> int:
    import json

    from bench.service import CIFAR_SPEC

    with open(weights, "rb") as f:
        m = api.check(
            api.http.post(
                "/api/v1/models",
                data={
                    "name": name,
                    "arch": "plain_cnn",
                    "class_names": json.dumps(classes),
                    "input_spec": json.dumps(CIFAR_SPEC),
                },
                files={"weights": (weights.name, f, "application/octet-stream")},
            ),
            201,
        )
    return m["id"]


def _components(env: dict, model_id: int, components_cls):
    """The component set the job stored, read from the catalog and artifacts the
    service uses."""
    from app.catalog import ComponentSet
    from app.settings import Settings
    from worker.runtime import Env

    settings = Settings(
        database_url=env["LEGO_DATABASE_URL"], storage_dir=Path(env["LEGO_STORAGE_DIR"])
    )
    e = Env.from_settings(settings)
    try:
        with e.catalog.session() as s:
            sha = s.query(ComponentSet).filter_by(model_id=model_id).one().artifact_sha256
        return components_cls.load(e.storage.require(sha))
    finally:
        e.catalog.dispose()


def _same(one, sharded) -> bool:
    if sharded.selected.keys() != one.selected.keys() or sharded.masks.keys() != one.masks.keys():
        return False
    for c in one.masks:
        if not torch.equal(sharded.selected[c], one.selected[c]):
            return False
        if sharded.masks[c].keys() != one.masks[c].keys():
            return False
        if not all(torch.equal(sharded.masks[c][k], m) for k, m in one.masks[c].items()):
            return False
    return True


# --------------------------------------------------------------------------- report


def _report(res, direct, load_s, times, identical, r50, rows, classes) -> None:
    t1, t2 = median(times["1"]), median(times["2"])
    speedup = median([a / b for a, b in zip(times["1"], times["2"], strict=True)])
    shards = (math.ceil(rows / SHARD_ROWS),) * 2
    work = (direct["select_s"], direct["contrib_s"])
    fixed = t1 - sum(work)
    o_fit = (t2 - fixed - phases(shards, work, 2, 0.0)) / sum(math.ceil(s / 2) for s in shards)
    t2_pred = predict_seconds(fixed, shards, work, 2, load_s)
    res.rows.append(
        Row(
            "7",
            f"{NAME}: wall time, 2 worker processes vs 1",
            unit="s",
            project=t2,
            baseline=t1,
            ratio=speedup,
            ratio_text=f"{speedup:.2f}x faster",
            goal="report",
            data={"1_worker": spread(times["1"]), "2_workers": spread(times["2"])},
        )
    )
    res.rows.append(
        Row(
            "7",
            "locate split over workers: masks and selected samples equal one pass",
            project_text="yes" if identical and all(identical) else "no",
            baseline_text="(one pass)",
            ratio_text=f"{sum(identical)}/{len(identical)} jobs identical",
            goal="identical",
            met=bool(identical) and all(identical),
        )
    )
    # ImageNet: 1.28 M rows, 1000 classes, 50 samples a class, ResNet-50 at 224x224.
    # Every row is decoded once for selection and every selected sample once more.
    im_shards = (
        math.ceil(IMAGENET_ROWS / IMAGENET_SHARD_ROWS),
        math.ceil(IMAGENET_ROWS / IMAGENET_SHARD_ROWS),
    )
    samples = 50 * IMAGENET_CLASSES
    im_work = (
        IMAGENET_ROWS * (r50["forward_s"] + r50["decode_s"]),
        samples * (r50["contrib_s"] + r50["decode_s"]),
    )
    stats_per_class = direct["stats_s"] / classes
    plain_layers = direct["layers"]
    im_fixed = max(fixed - direct["stats_s"], 0.0) + IMAGENET_CLASSES * stats_per_class * (
        r50["layers"] / plain_layers
    )
    # A helper's shard loads the model and its rows (decode counted in the work above);
    # the model and message part of o is taken as measured here.
    im_o = max(o_fit, load_s)
    predictions = {
        n: predict_seconds(im_fixed, im_shards, im_work, n, im_o) for n in PREDICT_WORKERS
    }
    res.data.update(
        {
            "one_worker_s": times["1"],
            "two_workers_s": times["2"],
            "direct": direct,
            "shard_load_s": load_s,
            "fixed_s": fixed,
            "o_fitted_s": o_fit,
            "t2_predicted_s": t2_pred,
            "resnet50": r50,
            "imagenet": {
                "rows": IMAGENET_ROWS,
                "shards": im_shards,
                "work_s": im_work,
                "fixed_s": im_fixed,
                "o_s": im_o,
                "predicted_s": predictions,
            },
        }
    )
    res.notes.append(
        f"The job: {NAME}; LEGO_LOCATE_SHARD_ROWS={SHARD_ROWS}. In this process, in the "
        f"same rounds as the jobs (medians): selection {direct['select_s']:.2f} s (a "
        f"forward pass over {rows:,} rows), contributions {direct['contrib_s']:.2f} s "
        f"({direct['samples']} samples); component statistics {direct['stats_s']:.2f} s "
        f"(once; one whole pass of lego_core.locate took {direct['one_pass_s']:.2f} s at "
        "the start). "
        f"Over the full stack (POST -> succeeded, medians of {len(times['1'])} rounds): one "
        f"worker process {t1:.2f} s, two {t2:.2f} s, {speedup:.2f}x. With one worker the "
        "job's own worker does every shard (the shard tasks it sends find them done); with "
        "two, the other takes shards as it receives their messages."
    )
    res.notes.append(
        "Cost model, T(N) = F + sum over the two phases of ceil(S/N) * (W/S + o) (o only "
        f"when N > 1), fitted here: W = {work[0]:.2f} s (selection) and {work[1]:.2f} s "
        f"(contributions), measured in this process; S = {shards[0]} shards a phase; F = T(1) - "
        f"W = {fixed:.2f} s (dispatch, loading model and data once, masks, statistics, "
        f"storing, polling). Per-shard overhead o: {load_s:.2f} s measured directly (a "
        f"shard task loading the model and the cached decoded dataset), {o_fit:.2f} s "
        f"fitted from T(2). With the measured o the model predicts T(2) = {t2_pred:.2f} s "
        f"against {t2:.2f} s measured ({(t2_pred - t2) / t2:+.0%}): the check of the model "
        "on this machine (2 cores shared with the API process, the benchmark and other "
        "users, so two workers do not get two whole cores)."
    )
    table = ", ".join(f"N={n}: {_hours(s)}" for n, s in predictions.items())
    res.notes.append(
        f"ImageNet-size prediction (1,281,167 images, 1000 classes, 50 samples a class, "
        f"ResNet-50 at 224x224, one core a worker process, CPU): per image here a forward "
        f"pass takes {r50['forward_s'] * 1000:.0f} ms, decoding and resizing a 500x375 "
        f"JPEG {r50['decode_s'] * 1000:.1f} ms, the contribution pass "
        f"{r50['contrib_s'] * 1000:.0f} ms a selected sample (measured in this run, random "
        f"weights), so W = {im_work[0] / 3600:.1f} h (selection) + "
        f"{im_work[1] / 3600:.1f} h (contributions); S = {im_shards[0]} shards a phase at "
        f"the default LEGO_LOCATE_SHARD_ROWS={IMAGENET_SHARD_ROWS:,}; F = "
        f"{im_fixed / 60:.1f} min (F here without statistics, plus statistics per class "
        f"scaled by classes and layers); o = {im_o:.1f} s. Predicted wall time: {table}. "
        f"Past N = {im_shards[0]} (one shard a worker per phase) more workers do not help; "
        "smaller shards (LEGO_LOCATE_SHARD_ROWS) let more workers share the phases at "
        "o a shard more."
    )
    res.notes.append(
        "Assumptions of the ImageNet prediction: every worker process has one core (1 "
        "intra-op thread) as here, and the same per-image speed; a GPU worker divides the "
        "forward and contribution terms by its speed-up, not measured here (no GPU lent: "
        "`make gpu-check` not run). A shard reads only its own rows: today a shard task "
        "loads the whole decoded dataset (lego_core.data holds it in memory, 193 GB for "
        "ImageNet at 224x224 uint8), so an ImageNet job needs a streaming dataset first; "
        "the decode term above is what streaming would cost a row. The statistics and "
        "masks (in F) run once, on the job's own worker."
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
