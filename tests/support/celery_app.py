"""A Celery app on the shared pool, for a real prefork worker in the tests.

``SP_CELERY_REDIS`` is the manager's Redis (redis://host:port); the broker
is on its db 0 and the results on db 1, each one setting. ``SP_CELERY_DIR``
is where tasks leave marks the test can see.
"""

from __future__ import annotations

import os
import time

from celery import Celery

_REDIS = os.environ.get("SP_CELERY_REDIS", "redis://127.0.0.1:6379")
_MARKS = os.environ.get("SP_CELERY_DIR", "/tmp")

app = Celery("sp_celery_test")
app.conf.update(
    broker_url=f"{_REDIS}/0",
    broker_transport="sharedpool.integrations.celery:Transport",
    result_backend=f"sharedpool.integrations.celery:Backend+{_REDIS}/1",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def stall_once(name: str, seconds: float) -> str:
    """Stalls the first time it runs (leaving its pid for the test to kill); returns at once when redelivered."""
    mark = os.path.join(_MARKS, name)
    if os.path.exists(mark):
        return f"redelivered to {os.getpid()}"
    with open(mark + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.rename(mark + ".tmp", mark)
    time.sleep(seconds)
    return "not killed"
