import sys

from sharedpool.cli import main

sys.exit(main())
