#!/bin/sh
# An rq worker (and its scheduler) on database 3 of the shared pool: the worker,
# its forked work horses and its scheduler all lease from the manager, so a host
# with many workers still opens at most the manager's max_connections to Redis.
#
#   sharedpool serve --redis-url redis://127.0.0.1:6379/0 &
#   sh examples/rq_worker.sh high default low
#
# In the app that enqueues, use the same database:
#   queue = rq.Queue("default", connection=sharedpool.Redis(db=3))
exec rq worker --with-scheduler \
    --connection-class sharedpool.SharedRedis \
    --url redis://127.0.0.1:6379/3 \
    "$@"
