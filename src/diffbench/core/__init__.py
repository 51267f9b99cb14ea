"""The math, with no Lightning in it: the noise schedule, heads, weightings, likelihood terms, U-Net."""
