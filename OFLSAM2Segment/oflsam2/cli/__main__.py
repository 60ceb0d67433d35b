"""``python -m oflsam2.cli``: the ``oflsam2`` command."""

import sys

from . import main

sys.exit(main())
