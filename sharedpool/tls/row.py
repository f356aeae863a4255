"""The two TLS record sequence numbers of a slot, in its lease-table row.

They sit in the row's tail (bytes 448..463), which no other field uses: the
take and give-back writes (and a C version of them) never touch it and need
not know about TLS. Only the holder of the slot's lock reads or writes
them: a taker reads them after its take, and writes them back before its
give-back, as a step of its own; the manager does the same around its own
I/O (the handshake, RESET). A holder that dies between the two leaves a
row that says held: the connection is replaced, so stale numbers are never
used.
"""

from __future__ import annotations

import mmap
import struct

from sharedpool.table.layout import HIST, HOLD_HIST_AT, ROW_SIZE, ROWS_AT

SEQS_AT = 448
SEQS = struct.Struct("=QQ")  # send (client -> server), receive (server -> client)
assert HOLD_HIST_AT + HIST.size <= SEQS_AT and SEQS_AT + SEQS.size <= ROW_SIZE


class RowSeqs:
    """Where one slot's sequence numbers live in a mapped table."""

    __slots__ = ("_map", "_at")

    def __init__(self, table_map: mmap.mmap, slot: int) -> None:
        self._map = table_map
        self._at = ROWS_AT + slot * ROW_SIZE + SEQS_AT

    def load(self) -> tuple[int, int]:
        send, recv = SEQS.unpack_from(self._map, self._at)
        return int(send), int(recv)

    def store(self, send_seq: int, recv_seq: int) -> None:
        # One copy of the packed bytes (as Table._put): a reader never sees a half-zeroed field.
        self._map[self._at : self._at + SEQS.size] = SEQS.pack(send_seq, recv_seq)
