"""`python -m diffbench.evaluate`: the command lives in `diffbench.cli.evaluate`."""

import sys

from diffbench.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
