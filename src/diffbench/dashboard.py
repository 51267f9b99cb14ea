"""`python -m diffbench.dashboard`: the command lives in `diffbench.cli.dashboard`."""

import sys

from diffbench.cli.dashboard import main

if __name__ == "__main__":
    sys.exit(main())
