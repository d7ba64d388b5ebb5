"""The model: config, the transformer in the paper's order, checkpoint loading, the demo checkpoint."""
