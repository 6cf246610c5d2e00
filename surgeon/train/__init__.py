"""Training and evaluation of surgeon outputs with PyTorch (the `train` extra).

Importing this package does not import torch, so `surgeon.cli` stays usable
without the extra. The submodules `data`, `evaluate`, `trainer` and `plot`
import torch, transformers or matplotlib at module level.
"""
