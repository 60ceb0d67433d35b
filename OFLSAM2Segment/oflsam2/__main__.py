"""``python -m oflsam2``: the ``oflsam2`` command."""

import sys

from .cli import main

sys.exit(main())
