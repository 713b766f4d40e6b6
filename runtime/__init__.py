"""The Aria model in plain PyTorch: config, checkpoints, model, preprocessing, generation."""
