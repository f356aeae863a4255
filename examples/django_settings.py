"""Django settings: the cache on db 1 and sessions on db 2, through one sharedpool manager.

Run the manager once per host (`sharedpool serve --redis-url redis://127.0.0.1:6379/0`);
every Django worker process then shares its connections. The LOCATION's
host and port must be the manager's Redis (checked at the first lease);
its db picks the database; a password in it is ignored (the manager logs in).
"""

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:6379/1",
        "OPTIONS": {
            "CONNECTION_POOL_CLASS": "sharedpool.SharedConnectionPool",
            # Optional: where the manager listens (default: $SHAREDPOOL_SOCKET_PATH or the
            # default socket) and how long to wait for a lease.
            "CONNECTION_POOL_KWARGS": {"acquire_timeout": 2.0},
        },
    },
    "sessions": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:6379/2",
        "OPTIONS": {"CONNECTION_POOL_CLASS": "sharedpool.SharedConnectionPool"},
    },
}

SESSION_ENGINE = "django.contrib.sessions.backends.cache"
SESSION_CACHE_ALIAS = "sessions"
