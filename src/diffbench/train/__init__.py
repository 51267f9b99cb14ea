"""Training: the one LightningModule, its callbacks, and building module, data and trainer from a config."""
