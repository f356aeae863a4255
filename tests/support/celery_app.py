"""A Celery app on the shared pool, for a real prefork worker in the tests.

``SP_CELERY_REDIS`` is the manager's Redis (redis://host:port), the
manager is at ``SHAREDPOOL_SOCKET``; broker and results are one setting
each. ``SP_CELERY_DIR`` is where tasks leave marks the test can see.
"""

from __future__ import annotations

import os
import time

from celery import Celery

_MARKS = os.environ.get("SP_CELERY_DIR", "/tmp")


def configure(app: Celery, redis_url: str, socket_path: str | None = None) -> Celery:
    """Broker and results on the shared pool: one setting each (``socket_path``, when
    given, in the settings rather than ``SHAREDPOOL_SOCKET``)."""
    app.conf.update(
        broker_url=f"{redis_url}/0",
        broker_transport="sharedpool.integrations.celery:Transport",
        # The results on the broker's database: a manager connection serves one
        # database at a time, and lending it to another costs a RESET.
        result_backend=f"sharedpool.integrations.celery:Backend+{redis_url}/0",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=600,
    )
    if socket_path:
        app.conf.sharedpool_socket_path = socket_path
        app.conf.broker_transport_options = {"sharedpool_socket_path": socket_path}
    return app


app = configure(Celery("sp_celery_test"), os.environ.get("SP_CELERY_REDIS", "redis://127.0.0.1:6379"))


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
