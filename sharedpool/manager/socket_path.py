"""Owning the control socket's path: its lock file, the bound listener, and
binding it again when someone deletes or replaces the socket file."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat

from sharedpool.config import ManagerConfig, socket_gid

log = logging.getLogger("sharedpool.manager")


class ManagerAlreadyRunning(RuntimeError):
    pass


class SocketPath:
    """The path the workers connect to, held by this manager for its whole life."""

    def __init__(self, config: ManagerConfig) -> None:
        self.path = config.socket_path
        self._group = config.socket_group
        self._gid = -1
        self._mode = config.socket_mode
        self.listener: socket.socket | None = None
        self._lock_file_fd = -1
        self._inode = -1

    def claim(self) -> socket.socket:
        """Take the path (refusing it if another manager serves it) and listen on it."""
        path = self.path
        parent = os.path.dirname(os.path.abspath(path))
        self._gid = socket_gid(self._group) if self._group else -1
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            if self._gid >= 0:
                # Members of the group may traverse to the socket, nobody else.
                os.chown(parent, -1, self._gid)
                os.chmod(parent, 0o750)
            else:
                os.chmod(parent, 0o700)
        info = os.stat(parent)
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise PermissionError(f"socket directory {parent} is writable by everyone; refusing to use it")
        # The lock file, held for the manager's life, decides who owns the
        # path: the kernel drops it when we die, so a stale socket file is
        # one whose lock is free.
        self._lock_file_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_file_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(self._lock_file_fd)
            os.close(self._lock_file_fd)
            self._lock_file_fd = -1
            raise ManagerAlreadyRunning(
                f"another manager (pid {owner}) already serves {path}; stop it or choose another --socket-path"
            ) from None
        os.ftruncate(self._lock_file_fd, 0)
        os.write(self._lock_file_fd, f"{os.getpid()}\n".encode())
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
            log.info("replacing stale socket file %s", path)
            os.unlink(path)
        return self._bind()

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        if self._gid >= 0:
            os.chown(self.path, -1, self._gid)
        os.chmod(self.path, self._mode)
        listener.listen(min(socket.SOMAXCONN, 4096))
        listener.setblocking(False)
        self.listener = listener
        self._inode = os.stat(self.path).st_ino
        return listener

    def lost(self) -> str:
        """Why the socket file is no longer ours ('deleted', 'replaced ...'), or '' while it is."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                return ""
            return "replaced by another file"
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return ""

    def rebind(self) -> socket.socket | None:
        """Close the listener (the loop stopped watching it) and bind a new socket file.

        Connected workers never notice; new ones find us again. None when
        that cannot be done (logged)."""
        path = self.path
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        try:
            if os.path.lexists(path):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    log.error("%s is now a file that is not a socket; not touching it: new workers cannot connect", path)
                    return None
                os.unlink(path)
            return self._bind()
        except OSError as exc:
            log.error("cannot create the control socket %s again: %s", path, exc)
            return None

    def close_listener(self) -> None:
        """Stop listening and remove the socket file, if it is still the one we bound."""
        if self.listener is None:
            return
        self.listener.close()
        self.listener = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Give the path up: another manager may claim it now."""
        if self._lock_file_fd >= 0:
            os.close(self._lock_file_fd)
            self._lock_file_fd = -1


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"
