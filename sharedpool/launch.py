"""Moved to ``sharedpool.dev.launch``; this name stays for imports written before the move."""

from sharedpool.dev.launch import ManagerProcess

__all__ = ["ManagerProcess"]
