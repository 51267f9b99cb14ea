"""Samplers and NLL estimators over a denoiser callable (x_t, t) → ε̂: they never see a head."""
