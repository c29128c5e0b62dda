"""fedml: federated learning across data sites, built on Flower's Message API."""

from fedml.errors import FedmlError

__all__ = ["FedmlError"]
__version__ = "0.1.0"
