"""The manager process behind ``sharedpool serve``: it owns the Redis connections."""

from sharedpool.manager.server import Manager, ManagerAlreadyRunning

__all__ = ["Manager", "ManagerAlreadyRunning"]
