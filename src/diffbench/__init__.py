"""diffbench: which diffusion objective to use, measured."""

__version__ = "0.1.0"
