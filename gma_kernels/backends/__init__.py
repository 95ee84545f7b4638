"""The backends. Each module has the same entry points, and only ``gma_kernels.dispatch``
imports them:

* ``run(job) -> Outcome``: aggregate and step (``job.step``) in one pass where it can;
* ``step(config, params, states, g, mask=None, *, guard) -> bool``: a step on a known ``g``;
* ``fold(batch, total, count, weighted)``: the streaming accumulator's sums;
* ``nonfinite_rows(batch) -> list[int]``: the clients whose update holds a NaN or an infinity.

``torch_ops`` runs PyTorch ops on any device; ``native`` the whole pass on CPU in C (``csrc/``);
``triton_kernel`` the fused GPU kernel.
"""
