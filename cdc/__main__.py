"""``python -m cdc``: the ``tieredcache-cdc`` command line (see :mod:`cdc.cli`)."""

import sys

from cdc.cli import main

sys.exit(main())
