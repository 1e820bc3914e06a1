"""Transformer building blocks: norms, positions, attention, MLP. Each is an NNX module or pure function."""
