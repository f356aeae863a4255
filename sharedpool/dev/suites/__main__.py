"""``python -m sharedpool.dev.suites``: see ``sharedpool.dev.suites.runner``."""

import sys

from sharedpool.dev.suites.runner import main

sys.exit(main())
