"""Experiments for flwr-fedtan: models, data loading and partitioning, and the Flower app."""
