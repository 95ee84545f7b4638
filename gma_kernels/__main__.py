"""``python -m gma_kernels``: versions and the backends usable here (``gma_kernels.info``)."""
from .info import report

print(report())
