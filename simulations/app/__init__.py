"""The Flower app of ``flwr run .``: ServerApp, ClientApp, the baselines it can run, models and data."""
