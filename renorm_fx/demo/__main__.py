"""``python -m renorm_fx.demo``: see :mod:`renorm_fx.demo`."""

import sys

from .cli import main

sys.exit(main())
