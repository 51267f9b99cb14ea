"""`python -m diffbench.report`: the command lives in `diffbench.cli.report`."""

import sys

from diffbench.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
