"""Quantization schemes and kernels. Knows tensors, not Aria."""
