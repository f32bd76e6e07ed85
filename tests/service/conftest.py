"""Service test fixtures (defined in service_helpers, which the tests also import)."""

from service_helpers import (  # noqa: F401
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
