"""Job execution: Celery tasks (full stack) and the embedded runner (no broker)."""
