"""Fuzz every operation of the OpenAPI schema with schemathesis, in-process (ASGI).

For each operation, schemathesis generates `LEGO_FUZZ_EXAMPLES` (default 25) requests
that follow the schema and as many that break it, sent with a valid key; operations with
ids in their path run once more with the ids of real resources (a finished assembly, its
models, dataset and job). Every answer must be free of 5xx, and must conform to the
schema: a documented status code, the documented content type, and a body that validates
against the documented response schema (errors included).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from rel_helpers import env_int
from service_helpers import JOURNEY_NEEDS, needs_lego

schemathesis = pytest.importorskip("schemathesis")

pytestmark = [needs_lego(*JOURNEY_NEEDS), pytest.mark.slow]

EXAMPLES = env_int("LEGO_FUZZ_EXAMPLES", 25)


def without_lifespan(app):
    """The app for schemathesis's in-process client: the `ready` fixture already runs its
    lifespan (job runner, reaper), which must not start twice."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await app(scope, receive, send)

    return wrapped


def test_fuzz_openapi_schema(ready, figures):
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    app = without_lifespan(ready.client.app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = {"Authorization": f"Bearer {ready.keys['alice']}"}
    # DELETE runs with another owner's key: it must answer 404 for alice's resources too,
    # and the fuzzing must not delete the fixture's assembly.
    bob = {"Authorization": f"Bearer {ready.keys['bob']}"}
    ids = ready.ids
    real = {
        "assembly_id": ids["assembly"],
        "model_id": ids["a"],
        "dataset_id": ids["dataset"],
        "job_id": ids["assembly_job"],
    }
    by_status: Counter[str] = Counter()
    by_operation: dict[str, Counter] = {}
    failures: dict[str, str] = {}
    unsatisfiable: list[str] = []
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 15, [o.label for o in operations]

    def run(op, strategy, label):
        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=os.environ.get("LEGO_FUZZ_SEED") is None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def one(case):
            headers = bob if op.method.upper() == "DELETE" else auth
            response = case.call(headers=headers)
            by_status[str(response.status_code)] += 1
            by_operation.setdefault(op.label, Counter())[str(response.status_code)] += 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (Exception, BaseExceptionGroup) as exc:  # collect all, fail once with the list
                titles = [x.strip() for x in str(exc).splitlines() if x.startswith("- ")]
                key = f"{label}: {'; '.join(titles) or str(exc).splitlines()[0]}"[:300]
                body = response.content[:300].decode("utf-8", "replace")  # may be a binary file
                failures.setdefault(key, f"{response.status_code} {body}")

        try:
            one()
        except Unsatisfiable:  # nothing to break (an operation without parameters or body)
            unsatisfiable.append(label)

    for op in operations:
        # {ref} is a model's or an assembly's (id, name@alias, name/version); {name} and
        # {version} of the v2 routes are an assembly's.
        ref = real["assembly_id"] if op.path.startswith("/api/v1/assemblies") else real["model_id"]
        real_here = {**real, "ref": str(ref), "name": str(real["assembly_id"]), "version": "1"}
        fixed = {k: v for k, v in real_here.items() if "{" + k + "}" in op.path}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run(op, op.as_strategy(generation_mode=mode), f"{op.label} [{mode.value}]")
            if fixed:
                run(
                    op,
                    op.as_strategy(generation_mode=mode, path_parameters=fixed),
                    f"{op.label} [{mode.value}, real ids]",
                )
    sent = sum(by_status.values())
    figures.record(
        "fuzz_openapi",
        operations=len(operations),
        examples_per_operation_and_mode=EXAMPLES,
        requests=sent,
        by_status=dict(sorted(by_status.items())),
        errors_5xx=sum(v for k, v in by_status.items() if k.startswith("5")),
        schema_violations=len(failures),
        without_negative_cases=unsatisfiable,
        by_operation={k: dict(v) for k, v in sorted(by_operation.items())},
    )
    assert not failures, "\n".join(f"{k}\n    -> {v}" for k, v in failures.items())
    # The app still works, and the jobs the fuzzing started end (before other tests look).
    assert ready.http.get(f"/api/v1/assemblies/{ids['assembly']}").json()["status"] == "succeeded"
    ready.settle()
