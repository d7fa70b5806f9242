"""Fused kernels (Triton) for the model's hot paths; the PyTorch references they must match live in the parent package."""
