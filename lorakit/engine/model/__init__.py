"""Models: loading, adapters, losses, checkpoints and data-parallel groups."""
