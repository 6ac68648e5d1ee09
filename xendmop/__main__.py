"""``python -m xendmop``: the same as the ``xendmop`` command."""

import sys

from .cli import main

sys.exit(main())
