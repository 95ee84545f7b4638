"""``python -m fedsim``: the same as ``python -m fedsim.run``."""
from .run import script

script()
