"""fedsim: a small federated-learning simulator built on ``gma_kernels``."""
