"""Evaluation of a trained denoiser: NLLs, sample-quality metrics, ground truth on gmm, pictures."""
