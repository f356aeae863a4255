"""Instructions per lease, counted by callgrind: the CPU cost of a lease without the machine's noise.

A fresh Python under ``valgrind --tool=callgrind`` takes N uncontended
get_connection + release pairs from the bench's manager; two runs of
different N, subtracted, leave the instructions of the extra leases alone
(start-up, attaching and the first fd fetch cancel out). Measured for the
C accelerator and for the pure-Python core, each in its own process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

# Fewer leases than the timing rounds: callgrind runs Python ~50x slower.
FEW, MANY = 1_000, 6_000
_TIMEOUT_S = 300.0

_SCRIPT = """
import sys
import sharedpool
pool = sharedpool.SharedConnectionPool(socket_path=sys.argv[1], protocol=int(sys.argv[2]))
get, release = pool.get_connection, pool.release
for _ in range(int(sys.argv[3])):
    release(get())
from sharedpool.table import core
print(core.PATH)
"""


def available() -> str | None:
    """The valgrind binary, or None."""
    return shutil.which("valgrind")


def _count(valgrind: str, socket_path: str, protocol: int, leases: int, pure: bool) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_PURE_PYTHON"}
    if pure:
        env["SHAREDPOOL_PURE_PYTHON"] = "1"
    with tempfile.TemporaryDirectory(prefix="sharedpool-callgrind-") as scratch:
        out_file = os.path.join(scratch, "callgrind.out")
        done = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={out_file}", sys.executable, "-c", _SCRIPT,
             socket_path, str(protocol), str(leases)],
            env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        with open(out_file) as counts:
            totals = re.search(r"^totals:\s+(\d+)", counts.read(), re.MULTILINE)
    if totals is None:
        raise RuntimeError("callgrind wrote no totals")
    return int(totals.group(1)), done.stdout.strip()


def per_lease(socket_path: str, protocol: int, pure: bool) -> tuple[float, str]:
    """(instructions per get_connection + release pair, the table core that ran them)."""
    valgrind = available()
    if valgrind is None:
        raise RuntimeError("valgrind is not on PATH")
    few, _path = _count(valgrind, socket_path, protocol, FEW, pure)
    many, path = _count(valgrind, socket_path, protocol, MANY, pure)
    return (many - few) / (MANY - FEW), path
