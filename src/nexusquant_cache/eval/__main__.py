"""``python -m nexusquant_cache.eval``: the ``eval`` subcommand without the console script."""

import argparse
import sys

from .runner import add_arguments, main

parser = add_arguments(argparse.ArgumentParser(prog="python -m nexusquant_cache.eval", description=__doc__))
try:
    sys.exit(main(parser.parse_args()))
except (ValueError, OSError) as error:
    print(f"eval: error: {error}", file=sys.stderr)
    sys.exit(1)
