"""Training and evaluation of surgeon outputs with PyTorch (the `train` extra).

Importing this package does not import torch, so `surgeon.cli` stays usable
without the extra. All submodules except `commands` import torch,
transformers or matplotlib at module level.
"""
