"""Helpers the tests share, one module per kind: each is written once here, never copied into a test file.

* ``waiting``: ``wait_for``, a poll on an observable condition with a deadline;
* ``cli``: ``run_cli``, the ``sharedpool`` command line as a subprocess;
* ``redis_view``: ``manager_clients``, a manager's connections as Redis lists them;
* ``mix``: ``checked_round_trip``, the request mix whose every read is checked;
* ``workers``: ``run_watching_the_cap``, worker processes run while Redis is watched for the cap;
* ``servers``: gunicorn and uWSGI masters started, asked and stopped (``Server``, ``wait_ready`` on any path).

(``hostile_peers`` beside this package holds the misbehaving control-socket peers.)
"""
