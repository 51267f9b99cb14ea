"""The commands: run, evaluate, sweep, report, dashboard, bench (thin; `python -m diffbench.<name>`)."""
