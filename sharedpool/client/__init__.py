from sharedpool.client.connection import LeasedConnection
from sharedpool.client.pool import Redis, SharedConnectionPool, SharedRedis
from sharedpool.client.process import after_fork_in_child, all_pools, close_control_channels, release_process_state

__all__ = [
    "LeasedConnection",
    "Redis",
    "SharedConnectionPool",
    "SharedRedis",
    "after_fork_in_child",
    "all_pools",
    "close_control_channels",
    "release_process_state",
]
