"""What the sync and the asyncio clients share around the lease core: the shells' common half.

Module map: ``pool_base`` (``PoolBase``: options, ``from_url``, cloning,
bounds, attaching, the requests' frames, the abort hook), ``options`` (the
redis-py options the manager owns), ``links`` (this process's control
connections, one per manager: shared by its pools), ``attachment`` (a
pool's view of one manager epoch, and what a welcome must say), ``frames``
(the control channel's frames and replies), ``clone`` (a pool's options:
parsing URLs, copies for forks and spawns), ``callsite`` (where a lease
was asked for), ``pinning`` (``lease()``'s pinned client).
"""
