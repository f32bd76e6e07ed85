"""Write the figures of the last run (.cache/reliability/last_run.json, or the file given)
into docs/RELIABILITY.md, between its `<!-- figures:start -->` and `<!-- figures:end -->`.

    .venv/bin/python tests/reliability/render_report.py [FIGURES.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "RELIABILITY.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"

TITLES = {
    "hostile_models": "Hostile input: pickled models that run code",
    "hostile_archives": "Hostile input: archives",
    "hostile_input": "Hostile input: images, base64, JSON, queries, paths, forms",
    "fuzz_openapi": "Hostile input: schemathesis over the OpenAPI schema",
    "auth": "Hostile input: keys on every route",
    "disk_full_embedded": "Disk full (embedded app, quick)",
    "disk_full_full_stack": "Faults: disk full (full stack)",
    "faults_worker_kills": "Faults: workers SIGKILLed mid-locate and mid-assembly",
    "faults_dependency_restarts": "Faults: Redis and PostgreSQL restarted under load",
    "load_200_assemblies": "Load: 200 assemblies at once",
    "load_memory_50_assemblies": "Load: API memory over 50 assemblies",
    "load_32_clients_predict": "Load: 32 clients predicting while 4 assemblies run",
}
# Long lists kept in the JSON only.
SKIP = {"cases", "detail", "examples", "by_operation", "by_route", "recorded_at"}


def fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        if len(value) > 12:
            value = value[:12] + ["..."]
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def render(figures: dict) -> str:
    out = []
    for key in [k for k in TITLES if k in figures] + sorted(set(figures) - set(TITLES)):
        f = figures[key]
        out.append(f"### {TITLES.get(key, key)}\n")
        out.append(f"`{key}`, recorded {f.get('recorded_at', '?')}\n")
        out.append("| figure | value |\n| --- | --- |")
        for k, v in f.items():
            if k in SKIP:
                continue
            out.append(f"| {k.replace('_', ' ')} | {fmt(v).replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else REPO / ".cache" / "reliability" / "last_run.json"
    figures = json.loads(src.read_text())
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n\n{render(figures)}\n{END}{tail}")
    print(f"wrote {len(figures)} sections into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
