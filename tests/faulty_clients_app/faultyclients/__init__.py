"""FedTAN clients with a fault each (see pyproject.toml)."""
