"""``sharedpool bench``: sharedpool against plain redis-py (and twemproxy) in one run.

Scenarios, with the targets of the lease-table issue (``report`` holds them):
S1 single-process GET latency, (a) one lease per command, (b) ten commands
per ``lease()``; S2 throughput of W workers doing requests of k commands
plus CPU and other I/O; S2' the same Redis-bound for several C; S3 worker
churn; S4 the twemproxy sidecar as the established alternative; S5 lease
operations per second, (a) one process alone, (b) W processes handing C
connections to each other; E2E gunicorn sync workers serving a small WSGI
app (``wsgi_app``) under wrk, plain and sharedpool per C.

Fairness rules that shape the code:

* every system runs against the same Redis, in the same invocation, in
  alternating order within each round (reversed every other round), and the
  report keeps medians over rounds;
* worker processes are forked, build their client, warm it up and say
  READY; only when all are ready does the parent open the measurement
  window, which every worker reads from one shared end time;
* everything has a deadline, and every child is killed in ``finally``,
  because this runs as a CI smoke test that must never hang.

Layout: ``settings`` (flags), ``jobs`` (what a forked worker is told to
do, and what the runner asks of the rig), ``rig`` (Redis, managers,
twemproxy, gunicorns), ``workers`` (the forked processes and the runner), ``e2e``
(gunicorn and wrk), ``wsgi_app``, ``scenarios``, ``report`` (targets,
table, JSON), ``main`` (``run_bench``).
"""

from sharedpool.bench.main import run_bench
from sharedpool.bench.settings import add_arguments

__all__ = ["add_arguments", "run_bench"]
