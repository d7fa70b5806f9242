"""Fast ops, each a triplet: a plain PyTorch reference, a fast version (Triton or an
optimised CPU path) with the same signature, and a test that compares them."""
