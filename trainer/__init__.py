"""The embedded Llama 3 trainer: model, data, sharded checkpoints and the training loop."""
