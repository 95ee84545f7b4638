"""Tests of ``fedsim.data``, one file per module. A package, so that its file names may repeat
those of ``tests/fedsim/algorithms`` (both have an ``irm`` module) under pytest's default import
mode."""
