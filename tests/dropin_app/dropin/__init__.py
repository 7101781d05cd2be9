"""dropin: a Flower / PyTorch app (test fixture of flwr-fedtan)."""
