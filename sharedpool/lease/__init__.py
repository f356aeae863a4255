"""The lease core, sans I/O: what the sync and the asyncio clients share of taking and giving back a lease.

Module map: ``context`` (the Protocols the core is typed against: what it
needs of an attachment and of a connection), ``core`` (takers, leases,
taking a free slot, giving a lease back, waking the next waiter),
``queue`` (a wait in the table's FIFO queue, step by step), ``state`` (a
connection's lease state and how a lease ends), ``session`` (what a
lease's commands did to the Redis session), ``budget`` (one time budget
for redis-py's retries of one call).

Nothing here blocks on anything but a table lock held for microseconds:
what needs the manager or a wait is returned for the caller to do.
"""
