"""GradAlign (Dandi et al., AAAI 2022): FedGA with a single local SGD step per round (one batch
of ``batch_size`` examples from ``y_k = w − β (ḡ − g_k)``), whatever ``local_epochs`` or
``local_steps`` say. Averaged with the data-size weights of ``ḡ``, the shifts cancel and the
server step is ``−η_l Σ p̄_k ∇f_k(y_k; batch)``: gradients taken at aligned points."""
from __future__ import annotations

from .fedga import FedGA


class GradAlign(FedGA):
    local_steps = 1
