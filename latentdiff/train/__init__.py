"""The torchrun trainer: `python -m latentdiff.train` (loop.py reads top to bottom)."""
