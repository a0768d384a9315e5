"""``python -m nexusquant_cache``: the ``nexusquant-cache`` command."""

import sys

from .cli import main

sys.exit(main())
