"""`python -m diffbench.run`: the command lives in `diffbench.cli.run`."""

import sys

from diffbench.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
