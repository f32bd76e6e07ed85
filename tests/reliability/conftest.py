"""Reliability test fixtures: the service tests' fixtures (tests/service/service_helpers.py),
an embedded app that already holds an assembled model, and the figures recorder that
writes tests/reliability/last_run.json."""

from __future__ import annotations

import sys
from pathlib import Path

_SERVICE = str(Path(__file__).resolve().parents[1] / "service")
if _SERVICE not in sys.path:
    sys.path.insert(0, _SERVICE)

from rel_helpers import figures, ready  # noqa: E402, F401
from service_helpers import (  # noqa: E402, F401
    api,
    digits,
    mnist_members,
    mnist_small,
    pg_url,
    redis_url,
    settings,
    shared_data,
    trained_lenets,
)
