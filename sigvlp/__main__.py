"""`python -m sigvlp ...` is the `sigvlp` command (also what torchrun runs: `torchrun -m sigvlp train ...`)."""

import sys

from sigvlp.cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports this module
    sys.exit(main())
