"""`python -m vlmft SUBCOMMAND ...`: the same as the `vlmft` console script."""

import sys

from vlmft.cli import main

sys.exit(main())
