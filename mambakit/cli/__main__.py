"""`python -m mambakit.cli`: the same as `mambakit` and `python -m mambakit`."""

import sys

from . import main

sys.exit(main())
