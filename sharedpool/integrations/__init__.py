"""Server integrations: what fits sharedpool into a pre-fork server.

* ``sharedpool.integrations.gunicorn``: gunicorn hooks under gunicorn's own
  names (``from sharedpool.integrations.gunicorn import *`` in
  ``gunicorn.conf.py``).
* ``sharedpool.integrations.uwsgi``: the ``@postfork`` registration and how
  to run the manager under uWSGI's master (``attach-daemon2``).

What both need, independent of any server, is re-exported here:

* ``IntegrationSettings`` / ``settings_from()`` (from ``.settings``): the
  integration's own settings, from ``SHAREDPOOL_*`` environment variables
  and keyword overrides;
* ``EmbeddedManager`` (from ``.embedded``): a manager run as a child of the
  server's master, restarted when it dies and stopped with the master;
* re-exported from ``sharedpool.client.process`` (the public client hooks):
  ``after_fork_in_child()``, ``release_process_state()`` and
  ``close_control_channels()``.

Environment variables read here (the manager's own settings, such as
``SHAREDPOOL_REDIS_URL`` or ``SHAREDPOOL_MAX_CONNECTIONS``, are read by the
manager itself, which inherits the master's environment):

``SHAREDPOOL_EMBEDDED``
    ``1``/``true``/``yes``/``on``: the master starts and supervises its own
    manager. Otherwise the workers use a manager run separately
    (``sharedpool serve``, systemd, ``attach-daemon2``...).
``SHAREDPOOL_SOCKET_PATH`` (or ``SHAREDPOOL_SOCKET``)
    The control socket. Embedded and unset: a fresh private directory per
    master, exported in ``SHAREDPOOL_SOCKET_PATH`` so that the workers (and
    a ``sharedpool.Redis()`` made at import time) find it.
``SHAREDPOOL_CONFIG``
    A TOML file for the embedded manager (``sharedpool serve --config``).
``SHAREDPOOL_MANAGER_LOG``
    File the embedded manager logs to (default: the master's stderr).
``SHAREDPOOL_START_TIMEOUT``
    Seconds the master waits for the embedded manager to answer (15).
``SHAREDPOOL_REPORT_TIMEOUT``
    Seconds the master waits for the manager when reporting a dead worker (1).
"""

from sharedpool.client.process import after_fork_in_child, close_control_channels, release_process_state
from sharedpool.integrations.embedded import EmbeddedManager, ManagerState, embedded_main
from sharedpool.integrations.settings import IntegrationSettings, settings_from

__all__ = [
    "EmbeddedManager",
    "IntegrationSettings",
    "ManagerState",
    "after_fork_in_child",
    "close_control_channels",
    "embedded_main",
    "release_process_state",
    "settings_from",
]
