"""moco: make a trained PyTorch classifier cheaper to run while keeping its predictions.

The package follows the user's path: profile -> capture -> analyse -> transform -> verify.
"""

__version__ = "0.1.0"
