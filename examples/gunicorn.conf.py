"""gunicorn config: every worker shares the manager's Redis connections.

    SHAREDPOOL_REDIS_URL=redis://127.0.0.1:6379/0 \\
        gunicorn -c examples/gunicorn.conf.py --chdir examples wsgi_app:app

    curl localhost:8000/incr; curl 'localhost:8000/echo?v=hi'; curl localhost:8000/pool

The master runs the manager itself (embedded) unless SHAREDPOOL_EMBEDDED=0
is set; then the workers use a manager you run separately at
SHAREDPOOL_SOCKET_PATH (``sharedpool serve``). Every other SHAREDPOOL_*
variable (SHAREDPOOL_MAX_CONNECTIONS, SHAREDPOOL_POOL_NAME...) reaches the
embedded manager as usual; keyword arguments of configure() win over them.
Command-line flags (--workers, --threads, --preload...) win over this file.

With no config file of your own, the hooks alone are enough:
    SHAREDPOOL_EMBEDDED=1 gunicorn -c python:sharedpool.integrations.gunicorn wsgi_app:app
"""

import os

from sharedpool.integrations import gunicorn as sharedpool_hooks
from sharedpool.integrations.gunicorn import *  # noqa: F401,F403  (on_starting, post_fork, child_exit...)

# Here, in the config file, so that it runs before gunicorn imports a
# preloaded app: a sharedpool.Redis() made at import time then already sees
# the socket path this exports.
sharedpool_hooks.configure(
    embedded=os.environ.get("SHAREDPOOL_EMBEDDED", "1") not in ("0", "false", "no", "off"),
    # Only a default: SHAREDPOOL_MAX_CONNECTIONS, when set, decides.
    max_connections=None if "SHAREDPOOL_MAX_CONNECTIONS" in os.environ else 4,
)

bind = "127.0.0.1:8000"
workers = 4
# Recycled workers cost nothing here: the manager keeps the connections.
max_requests = 1000
max_requests_jitter = 100
# gunicorn 27 opens a control socket at ~/.gunicorn/gunicorn.ctl by default;
# two instances on one host would collide there.
control_socket_disable = True


# A hook of your own next to ours: call ours first (or use sharedpool_hooks.chain).
def post_fork(server, worker):  # noqa: F811
    sharedpool_hooks.post_fork(server, worker)
    server.log.info("worker %s ready; sharedpool socket %s", worker.pid, os.environ.get("SHAREDPOOL_SOCKET_PATH"))
