"""``python -m sharedpool``: the same command line as ``sharedpool``."""

import sys

from sharedpool.cli import main

sys.exit(main())
