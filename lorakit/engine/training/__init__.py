"""The training run behind `lorakit train`: its state, steps, optimizer, metrics log and loss curve."""
