"""TLS to Redis with no hop (``rediss://``): the manager's handshake, one record layer for all.

* ``handshake``: the manager's TLS 1.3 handshake over an SSLObject and memory
  buffers, its options (redis-py's ``ssl_*`` names) and its one-line refusals;
* ``keys``: traffic keys from the handshake's secrets, and the ``Handover``
  sent to a worker once with the fd;
* ``records``: the record layer (seal, open, what breaks a connection);
* ``row``: the two sequence numbers in the lease table's row;
* ``transport``: ``TLSSocket``, the socket-shaped object redis-py reads and writes.

Needs the ``cryptography`` package (``pip install 'sharedpool[tls]'``).
"""

from __future__ import annotations

INSTALL_HINT = "rediss:// needs the cryptography package: pip install 'sharedpool[tls]'"


def available() -> bool:
    try:
        import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
    except ImportError:
        return False
    return True
