"""What the sync and the asyncio clients share around the lease core: the shells' common half.

Module map: ``attachment`` (this process's view of one manager epoch, and
what a welcome must say), ``clone`` (a pool's options: parsing URLs,
copies for forks and spawns), ``callsite`` (where a lease was asked for),
``pinning`` (``lease()``'s pinned client).
"""
