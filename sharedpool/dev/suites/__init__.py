"""Libraries' own test suites, run plain and through the shared pool: every test that passes plain must pass shared.

``python -m sharedpool.dev.suites [SUITE...]`` fetches each suite's PyPI
sdist (the installed version) into a temporary directory, starts one
redis-server and one manager serving every database, runs the suite's test
modules twice (plain redis-py, then with the pool swapped in by
``sharedpool.dev.suites.plugin``), and reports each test that passed plain
and did not pass shared. Those listed in ``known.toml`` (REFERENCE.md's
drop-in table says why) are expected; any other fails the run.
"""
