"""Development tools, not the public API: what the demo, the benchmark and the tests run.

* ``launch``: ``ManagerProcess``, a ``sharedpool serve`` child that is ready when started;
* ``redis_server``: which Redis server binary runs, and ``RedisServer``, a throwaway one;
* ``demo``: ``sharedpool demo``.
"""
