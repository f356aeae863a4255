"""The manager process behind ``sharedpool serve``: it owns the Redis connections.

Modules, one job each: ``loop`` (the epoll loop, timers, signals, and the
``Manager`` that wires the rest), ``control`` (control connections: admit,
read frames), ``handlers`` (the answer to each frame type), ``reaper`` (the
sweep of the lease table, liveness), ``table_keeper`` (the manager's locks
on and writes to the lease table), ``snapshot`` (the stats), ``socket_path``
(claiming and keeping the control socket's path), ``pool`` (the pure state
machine of slots), ``backend`` (one Redis connection).
"""

from sharedpool.manager.loop import Manager
from sharedpool.manager.socket_path import ManagerAlreadyRunning

__all__ = ["Manager", "ManagerAlreadyRunning"]
