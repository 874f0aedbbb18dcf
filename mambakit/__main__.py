"""`python -m mambakit`: the same as the `mambakit` command (mambakit.cli)."""

import sys

from .cli import main

sys.exit(main())
