"""Adapters between ``gma_kernels`` and federated-learning frameworks.

Each adapter is imported explicitly, and only it imports its framework:

* ``gma_kernels.integrations.flower``: Flower strategies (``GMAFedAvg``, ``GMAFedAvgM``,
  ``GMAFedAdam``, ``GMAFedYogi``, ``GMAFedAdagrad``); needs ``flwr >= 1.22``.
* ``gma_kernels.integrations.pfl``: ``GMAFederatedAveraging``, a pfl-research
  ``FederatedAlgorithm`` (FedAvg's local training, a GMA server step from the summed
  statistics); needs ``pfl[pytorch]``.
* ``gma_kernels.integrations.arrays``: ``aggregate_arrays`` (lists of NumPy arrays, as NVFlare,
  FedML or pfl-research hand them over) and ``aggregate_state_dicts`` (PyTorch state dicts);
  needs nothing beyond NumPy and PyTorch.
* ``gma_kernels.integrations.codec``: what both share (the float layout of a model's arrays,
  the rounded weighted mean of its integer and boolean arrays); no framework either.

``import gma_kernels`` imports none of them.
"""
