"""`python -m sigvlp ...` is the `sigvlp` command (also what torchrun runs: `torchrun -m sigvlp train ...`)."""

import sys

from sigvlp.cli import main

sys.exit(main())
