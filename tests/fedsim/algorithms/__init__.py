"""Tests of ``fedsim.algorithms``, one file per module (``test_registry.py``: the package's
``__init__``, the names and ``build_algorithm``; ``test_base.py``: what holds for every
algorithm). A package, so that its file names may repeat those of ``tests/fedsim/data`` (both
have an ``irm`` module) under pytest's default import mode."""
