"""`python -m diffbench.run experiment=eps_simple [key=value …]`: train one arm, draw a sample
grid, and leave a run directory with config, checkpoints, metrics CSV and results.json. The
sequence itself is `diffbench.pipeline`; this is the command line around it: arguments,
messages and exit codes."""

from __future__ import annotations

import sys

from diffbench.cli.checks import check_settings, refuse
from diffbench.config import ConfigError, compose
from diffbench.data.vision import DatasetMissingError
from diffbench.evaluation.fidelity import InceptionWeightsMissingError
from diffbench.pipeline import Stopped, train
from diffbench.train.build import set_threads

STOPPED = 128 + 15
"""Exit code of a run stopped by SIGTERM (the shell's convention for a process ended by signal 15)."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        spec = check_settings(compose(args))
        print(
            f"[diffbench] {set_threads(spec)} torch thread(s) (speed.threads or $DIFFBENCH_THREADS to change)"
        )
        train(spec)
    except (ConfigError, DatasetMissingError, InceptionWeightsMissingError) as error:
        return refuse("run", error)
    except Stopped as stop:
        print(f"diffbench.run: {stop}", file=sys.stderr)
        return STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
