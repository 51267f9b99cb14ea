"""`python -m diffbench.bench`: the command lives in `diffbench.cli.bench`."""

import sys

from diffbench.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
