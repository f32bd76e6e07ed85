"""Job handlers: locate components, assemble a model. Thin layers over lego_core.

Each handler reads its inputs from the catalog and storage, calls lego_core,
writes artifacts atomically and returns a `Result` whose `apply` records the
catalog rows in the same transaction that marks the job succeeded.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import adapters
from app.catalog import (
    ACTIVE_STATES,
    Assembly,
    Component,
    ComponentSet,
    Dataset,
    Job,
    Model,
)
from worker.runtime import Deferred, JobContext, Result
from worker.shards import shard_count, sharded_locator


def _lego_error(msg: str) -> Exception:
    from lego_core.errors import LegoError

    return LegoError(msg)


def latest_component_set(s: Session, model_id: int) -> ComponentSet | None:
    return s.scalar(
        select(ComponentSet)
        .where(ComponentSet.model_id == model_id)
        .order_by(ComponentSet.id.desc())
        .limit(1)
    )


def locate_jobs_for(s: Session, owner: str, model_id: int, active: bool) -> list[Job]:
    q = select(Job).where(Job.owner == owner, Job.kind == "locate").order_by(Job.id.desc())
    if active:
        q = q.where(Job.status.in_(ACTIVE_STATES))
    return [j for j in s.scalars(q) if (j.payload or {}).get("model_id") == model_id]


def no_components_reason(s: Session, owner: str, model_id: int) -> str:
    msg = f"model {model_id} has no located components; POST /api/v1/models/{model_id}/locate"
    last = locate_jobs_for(s, owner, model_id, active=False)
    if last and last[0].status == "failed":
        msg += f" (its last locate job {last[0].id} failed: {last[0].error})"
    return msg


def located_data(ctx: JobContext, m: Model, ds: Dataset, spec):
    """The dataset as components are located on it: the model's classes that it has,
    in the model's order. Assembly loads it the same way (components refer to its
    samples by index)."""
    classes = [c for c in m.class_names if c in ds.classes]
    if not classes:
        raise _lego_error(f"dataset {ds.id} has none of model {m.id}'s classes")
    return adapters.load_dataset(ctx.storage, ctx.env.settings, ds, spec, classes=classes)


# --------------------------------------------------------------------------- locate


def locate_job(ctx: JobContext) -> Result:
    from lego_core import Components, Locator, check_warning, component_stats, locate_checked

    p = ctx.payload
    parameters = {
        "samples_per_class": p.get("samples_per_class"),
        "alpha": p.get("alpha"),
        "beta": p.get("beta"),
    }
    key = adapters.params_key(parameters)
    with ctx.session() as s:
        m = s.get(Model, p["model_id"])
        ds = s.get(Dataset, p["dataset_id"])
        if m is None or ds is None:
            raise _lego_error("the model or dataset of this job was deleted")
        existing = s.scalar(
            select(ComponentSet.id).where(
                ComponentSet.model_id == m.id,
                ComponentSet.dataset_id == ds.id,
                ComponentSet.params_key == key,
            )
        )
        if existing is not None:
            return Result({"component_set_id": existing, "reused": True})
        s.expunge(m)
        s.expunge(ds)

    ctx.progress(0.02, "loading model")
    source = adapters.load_model(ctx.storage, m)
    ctx.progress(0.05, "loading dataset")
    data = located_data(ctx, m, ds, source.spec)
    ctx.progress(0.1, "locating components")
    shards = shard_count(ctx.env.settings, len(data))
    if shards > 1:  # Celery: the job's shards go to every worker (worker/shards.py)
        locator = sharded_locator(ctx, source, data, shards, ctx.sub(0.1, 0.7))
        start = 0.7
    else:
        n = {"samples_per_class": p["samples_per_class"]} if p.get("samples_per_class") else {}
        locator, start = Locator(source, data, device=ctx.device, **n), 0.1
    comps = locate_checked(
        source,
        data,
        alpha=parameters["alpha"],
        beta=parameters["beta"],
        progress=ctx.sub(start, 0.85),
        device=ctx.device,
        locator=locator,
    )
    comps.stats = component_stats(source, comps, progress=ctx.sub(0.85, 0.95))
    ctx.progress(0.96, "saving components")
    with ctx.storage.temp_path(".pt") as t:
        comps.save(t)
        Components.load(t)  # what was written reads back
        sha, _ = ctx.store_file(t)
    summary = comps.summary()
    used = dict(getattr(comps, "parameters", None) or parameters)

    def apply(s: Session) -> dict:
        cs = ComponentSet(
            owner=ctx.owner,
            model_id=m.id,
            dataset_id=ds.id,
            parameters=used,
            params_key=key,
            artifact_sha256=sha,
            job_id=ctx.job_id,
        )
        s.add(cs)
        s.flush()
        for name, info in summary.items():
            s.add(
                Component(
                    component_set_id=cs.id,
                    class_index=m.class_names.index(name) if name in m.class_names else -1,
                    class_name=str(name),
                    params=int(info.get("params", 0)),
                    flops=int(info.get("flops", 0)),
                    samples=int(info.get("samples", 0)),
                    layers={k: list(v) for k, v in (info.get("layers") or {}).items()},
                )
            )
        return {"component_set_id": cs.id}

    result = {"classes": len(summary), "check": comps.parameters.get("check")}
    warning = check_warning(comps)
    if warning:
        result["warning"] = warning
    return Result(result, apply)


# --------------------------------------------------------------------------- assemble


def assemble_job(ctx: JobContext) -> Result:
    from lego_core import Components, Part, assemble, evaluate_assembly

    settings = ctx.env.settings
    assembly_id = ctx.payload["assembly_id"]
    plan = []
    with ctx.session() as s:
        a = s.get(Assembly, assembly_id)
        if a is None:
            raise _lego_error(f"assembly {assembly_id} was deleted")
        for src in a.sources:
            cs = (
                s.get(ComponentSet, src.component_set_id)
                if src.component_set_id
                else latest_component_set(s, src.model_id)
            )
            if cs is None:
                pending = locate_jobs_for(s, ctx.owner, src.model_id, active=True)
                if pending:
                    raise Deferred(
                        f"waiting for model {src.model_id}'s components (job {pending[0].id})",
                        delay_s=2.0,
                    )
                raise _lego_error(no_components_reason(s, ctx.owner, src.model_id))
            m = s.get(Model, src.model_id)
            ds = s.get(Dataset, cs.dataset_id)
            for row in (m, ds, cs):
                s.expunge(row)
            plan.append((src.id, m, cs, ds, list(src.class_indices)))
        options = dict(a.options or {})
        evals = [s.get(Dataset, i) for i in (a.eval_dataset_ids or [])]
        if any(e is None for e in evals):
            raise _lego_error("an evaluation dataset of this assembly was deleted")
        for e in evals:
            s.expunge(e)

    parts = []
    models: dict[str, Model] = {}
    for n, (_sid, m, cs, ds, indices) in enumerate(plan):
        ctx.progress(0.3 * n / len(plan), f"loading model {m.id}")
        source = adapters.load_model(ctx.storage, m)
        comps = Components.load(ctx.storage.require(cs.artifact_sha256))
        data = located_data(ctx, m, ds, source.spec)
        source_id = f"model:{m.id}"
        models[source_id] = m
        parts.append(Part(source, comps, classes=indices, data=data, source_id=source_id))

    ctx.progress(0.3, "assembling")
    kwargs = {k: options[k] for k in ("scaling", "form") if options.get(k)}
    if options.get("compensate") is not None:
        kwargs["compensate"] = bool(options["compensate"])
    assembled = assemble(
        parts,
        progress=ctx.sub(0.3, 0.8),
        calibration_per_class=options.get("calibration_per_class")
        or settings.calibration_per_class,
        device=ctx.device,
        **kwargs,
    )

    metrics = None
    if evals:
        ctx.progress(0.8, "evaluating")
        wanted = set(assembled.class_names)
        datasets = [
            adapters.load_dataset(
                ctx.storage,
                settings,
                e,
                assembled.spec,
                classes=[c for c in e.classes if c in wanted] or None,
            )
            for e in evals
        ]
        metrics = evaluate_assembly(assembled, datasets)

    # The lineage in the file names the exact source weights, not only a catalog id
    # (which says nothing outside this catalog).
    for entry in assembled.lineage:
        m = models.get(entry.get("source"))
        if m is not None:
            entry.update(source_lineage(m))

    ctx.progress(0.95, "exporting")
    with ctx.storage.temp_path(".pt") as t:
        adapters.export(assembled, t)
        sha, size = ctx.store_file(t)

    classes = []
    for i, entry in enumerate(assembled.lineage):
        m = models.get(entry.get("source"))
        classes.append(
            {
                "index": i,
                "name": assembled.class_names[i],
                "source_model_id": m.id if m else None,
                "source_model_name": m.name if m else None,
                "source_model_version": m.version if m else None,
                "source_weights_sha256": m.weights_sha256 if m else None,
                "source_class": entry.get("class_name"),
                "source_class_index": entry.get("class_index"),
            }
        )
    spec = assembled.spec.to_dict()
    resolved = {sid: cs.id for sid, _m, cs, _ds, _ix in plan}

    def apply(s: Session) -> dict:
        a = s.get(Assembly, assembly_id)
        if a is None:
            raise _lego_error(f"assembly {assembly_id} was deleted")
        a.artifact_sha256 = sha
        a.classes = classes
        a.metrics = _jsonable(metrics)
        a.input_spec = spec
        for src in a.sources:
            src.component_set_id = resolved.get(src.id, src.component_set_id)
        return None

    return Result({"artifact_sha256": sha, "bytes": size, "classes": len(classes)}, apply)


def source_lineage(m: Model) -> dict:
    return {
        "source_model_id": m.id,
        "source_model_name": m.name,
        "source_model_version": m.version,
        "source_arch": m.arch,
        "source_weights_sha256": m.weights_sha256,
    }


def _jsonable(x):
    if x is None or isinstance(x, str | bool):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, int):
        return int(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


HANDLERS = {"locate": locate_job, "assemble": assemble_job}
