"""Federated datasets: sources, client splits and coloring, assembled by :func:`load_federated`."""
from .federated import DATASETS, DEFAULT_DATASET, FederatedDataset, coloring_of, load_federated

__all__ = ["DATASETS", "DEFAULT_DATASET", "FederatedDataset", "coloring_of", "load_federated"]
