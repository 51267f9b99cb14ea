"""`python -m diffbench.sweep`: the command lives in `diffbench.cli.sweep`."""

import sys

from diffbench.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
