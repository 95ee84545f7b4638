"""GMA for pfl-research (Apple's ``pfl``): ``GMAFederatedAveraging``, a pfl
``FederatedAlgorithm`` whose users train as in pfl's ``FederatedAveraging`` and whose central
step is GMA's ``ServerOptimizer`` (sgd, momentum, adam, yogi, adagrad) on the masked
pseudo-gradient ``g = m ⊙ Σ_k p̄_k Δ_k``.

What each user sends (``GMAStatistics``, a pfl ``MappedVectorStatistics``) is what GMA's two sums
need, so that pfl's ``SumAggregator`` (and, across worker processes, its all-reduce of
``get_weights()``) builds them unchanged:

* under each model variable's name, the weighted update ``p_k Δ_k`` (pfl's convention: the
  values are pre-weighted, the weight is ``p_k``);
* under ``"gma/sign/" + name``, ``a_k sign(Δ_k)``: ``a_k = 1``, or ``p_k`` with
  ``weighted_agreement``; a weighting postprocessor's ``reweight`` (``WeightByDatapoints``,
  ``WeightByUser``) scales those only when the agreement is weighted;
* under ``"gma/users"``, the number of users (1), never reweighted.

Summed over the cohort, these are the ``S = Σ_k p_k Δ_k``, ``C = Σ_k a_k sign(Δ_k)``, ``Σ p_k``
(the statistics' weight) and K of a ``gma_kernels.Accumulator``. Each user's pair is folded by
an ``Accumulator`` (so its signs and its screening of NaN and inf are the library's); the
central step loads the sums into one and steps the model's parameters with
``ServerOptimizer.step_accumulated``. With ``tau=0``, ``optimizer="sgd"`` and ``lr=1`` this is
pfl's ``FederatedAveraging`` with a central ``torch.optim.SGD(lr=1)``.

The model's own ``central_optimizer`` (which ``PyTorchModel`` requires) is not used: the server
optimizer's settings are this algorithm's. Privacy postprocessors (clipping, noise) would treat
the sign entries as part of the update; GMA with pfl's differential privacy is not supported.
Needs ``pfl`` (``pip install 'pfl[pytorch]'``) with a ``PyTorchModel``. Example:
``docs/arrays-and-distributed.md`` ("pfl-research").
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

try:
    from pfl.algorithm import FederatedAveraging
    from pfl.metrics import Metrics, StringMetricName, Summed, Weighted
    from pfl.stats import MappedVectorStatistics
except ImportError as _err:  # pragma: no cover - exercised only without pfl
    raise ImportError("gma_kernels.integrations.pfl needs pfl-research: pip install "
                      "'pfl[pytorch]'") from _err

from .. import Accumulator, FlatLayout, GMAStats, MaskConfig, ServerOptimizer, StepConfig
from .. import NonFiniteError, flatten
from ..config import MaskKind, NonFinitePolicy, OptimizerKind, Placement

__all__ = ["GMAFederatedAveraging", "GMAStatistics", "SIGN_PREFIX", "USERS_KEY"]

SIGN_PREFIX = "gma/sign/"
"""Prefix of the keys holding ``a_k sign(Δ_k)`` of each model variable."""
USERS_KEY = "gma/users"
"""Key of the number of users the statistics sum over (a 1-element tensor)."""

_STATE_FILE = "gma_server_optimizer.pt"


class GMAStatistics(MappedVectorStatistics):
    """A user's (or a cohort's sum of) GMA statistics: ``p Δ`` per variable, ``a sign(Δ)`` per
    variable under ``SIGN_PREFIX``, the user count under ``USERS_KEY``; ``weight`` is ``Σ p``.

    Adds like any ``MappedVectorStatistics`` (key by key, weights summed). ``reweight`` scales
    the updates, and the signs only when ``weighted_agreement``; the user count never."""

    def __init__(self, name_to_stats: dict[str, Tensor] | None = None, weight: float = 1.0,
                 weighted_agreement: bool = False) -> None:
        super().__init__(name_to_stats, weight)
        self.weighted_agreement = weighted_agreement

    def _kept(self, key: str) -> bool:
        """Whether ``reweight`` leaves the entry ``key`` as it is."""
        return key == USERS_KEY or (key.startswith(SIGN_PREFIX) and not self.weighted_agreement)

    def reweight(self, new_weight: float) -> None:
        multiplier = float(new_weight / self.weight)
        for key in list(self.keys()):
            if not self._kept(key):
                self[key] = self[key] * multiplier
        self.weight = new_weight

    def __add__(self, other: GMAStatistics) -> GMAStatistics:
        if not isinstance(other, GMAStatistics):
            raise TypeError(f"GMA statistics add only to GMA statistics, got "
                            f"{type(other).__name__}")
        if other.weighted_agreement != self.weighted_agreement:
            raise ValueError("GMA statistics differ in weighted_agreement")
        if set(self.keys()) != set(other.keys()):
            raise ValueError("GMA statistics must have the same keys to be added")
        return GMAStatistics({k: v + other[k] for k, v in self.items()},
                             self.weight + other.weight, self.weighted_agreement)

    def from_weights(self, metadata: Any, weights: list) -> GMAStatistics:
        stats = super().from_weights(metadata, weights)
        stats.weighted_agreement = self.weighted_agreement
        return stats

    def __repr__(self) -> str:
        return (f"GMAStatistics(weight={self.weight}, weighted_agreement="
                f"{self.weighted_agreement}, keys={list(self.keys())})")


class GMAFederatedAveraging(FederatedAveraging):
    """pfl's ``FederatedAveraging`` with a GMA central step (module docstring).

    Keyword-only settings, all checked here, before anything runs (a bad one raises
    ``ValueError`` naming it): the mask ``tau``, ``mask``, ``weighted_agreement``, ``rescale``
    (``gma_kernels.MaskConfig``); the server optimizer ``optimizer`` (``"sgd"``,
    ``"momentum"``, ``"adam"``, ``"yogi"``, ``"adagrad"``), ``lr``, ``momentum``, ``beta1``,
    ``beta2``, ``eps``, ``mask_placement``, ``bias_correction`` (``gma_kernels.StepConfig``);
    ``nonfinite``: ``"raise"`` (a user whose update holds NaN or inf stops the run, naming the
    user) or ``"drop"`` (that user is left out of the sums, counted in the metric
    ``"GMA dropped users"``); ``backend`` (as in ``ServerOptimizer``).

    After a central step, ``server_optimizer`` holds the optimizer (its state survives pfl's
    checkpointing: ``save``/``load``) and ``last_stats`` the mask's ``GMAStats``; the
    metrics ``"GMA mask density"``, ``"GMA mean agreement"`` and ``"GMA users"`` go to pfl's
    callbacks.
    """

    def __init__(self, *, tau: float = 0.4, mask: MaskKind = "soft",
                 weighted_agreement: bool = False, rescale: bool = False,
                 optimizer: OptimizerKind = "sgd", lr: float = 1.0, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3,
                 mask_placement: Placement = "before", bias_correction: bool = False,
                 nonfinite: NonFinitePolicy = "raise", backend: str = "auto") -> None:
        name = type(self).__name__
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"{name}: nonfinite={nonfinite!r} is not one of 'raise', 'drop'")
        try:
            self.mask_config = MaskConfig(tau, mask, weighted_agreement, rescale)
            self.step_config = StepConfig(optimizer, lr, momentum, beta1, beta2, eps,
                                          mask_placement, bias_correction)
            # the optimizer's own cross-checks (rescale with placement, the backend's name)
            ServerOptimizer.from_configs(torch.zeros(1), self.step_config, self.mask_config,
                                         backend=backend, nonfinite=nonfinite)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        super().__init__()
        self.nonfinite = nonfinite
        self.backend = backend
        self.server_optimizer: ServerOptimizer | None = None
        self.last_stats: GMAStats | None = None
        self._layout: FlatLayout | None = None
        self._saved_state: dict | None = None

    # ----------------------------------------------------------------- the users' side

    def train_one_user(self, initial_model_state, model, user_dataset, central_context
                       ) -> tuple[GMAStatistics | None, Metrics]:
        """Local training as in ``FederatedAveraging``, then the user's GMA statistics (None,
        with ``nonfinite="drop"``, for an update holding NaN or inf)."""
        difference, metrics = super().train_one_user(initial_model_state, model, user_dataset,
                                                     central_context)
        delta, layout = flatten(dict(difference.items()))
        acc = Accumulator(layout.numel, device=delta.device, backend=self.backend,
                          nonfinite=self.nonfinite,
                          weighted_agreement=self.mask_config.weighted_agreement)
        try:
            acc.add(delta, float(difference.weight))
        except NonFiniteError:
            raise NonFiniteError(f"user {user_dataset.user_id!r}: its model update holds NaN "
                                 "or inf (nonfinite='drop' leaves such users out)") from None
        # every user reports the metric: pfl sums only metrics with the same names
        metrics[StringMetricName("GMA dropped users")] = Summed(len(acc.dropped))
        if acc.dropped:
            return None, metrics
        data = dict(layout.views(acc.total))
        data.update((SIGN_PREFIX + n, v) for n, v in layout.views(acc.count).items())
        data[USERS_KEY] = acc.buffer[-1:]
        return GMAStatistics(data, difference.weight, self.mask_config.weighted_agreement), metrics

    # ----------------------------------------------------------------- the central step

    def process_aggregated_statistics(self, central_context, aggregate_metrics, model,
                                      statistics) -> tuple[Any, Metrics]:
        """One server step from the cohort's summed ``GMAStatistics``, in place on the model's
        variables (``model.variable_map``)."""
        if not isinstance(statistics, GMAStatistics):
            raise TypeError(f"{type(self).__name__} steps from GMAStatistics (what its users "
                            f"send), got {type(statistics).__name__}: a postprocessor or "
                            "aggregator replaced them")
        variables = model.variable_map
        opt = self._optimizer(variables)
        acc = self._accumulator(statistics, opt.params.device)
        views = self._layout.views(opt.params)
        with torch.no_grad():
            for name, value in variables.items():  # the model as it is now
                views[name].copy_(value)
            stats = opt.step_accumulated(acc)
            for name, value in variables.items():
                value.copy_(views[name])
        self.last_stats = stats
        values = stats.as_dict()
        metrics = Metrics()
        for label, value in (("GMA mask density", values["mask_density"]),
                             ("GMA mean agreement", values["mean_agreement"]),
                             ("GMA users", values["clients"])):
            metrics[StringMetricName(label)] = Weighted.from_unweighted(value)
        return model, metrics

    def process_aggregated_statistics_from_all_contexts(self, stats_context_pairs,
                                                        aggregate_metrics, model):
        """As pfl's, except that a round with no statistics (every user dropped) leaves the
        model unchanged."""
        if not stats_context_pairs:
            return model, Metrics()
        return super().process_aggregated_statistics_from_all_contexts(
            stats_context_pairs, aggregate_metrics, model)

    def _optimizer(self, variables: dict[str, Tensor]) -> ServerOptimizer:
        """The server optimizer over a flat float32 copy of the model's variables (made on
        the first step; the model must keep its variables' names and shapes)."""
        layout = FlatLayout.of(variables)
        if self.server_optimizer is None:
            params, self._layout = flatten({n: v.detach() for n, v in variables.items()})
            self.server_optimizer = ServerOptimizer.from_configs(
                params, self.step_config, self.mask_config, backend=self.backend,
                nonfinite=self.nonfinite)
            if self._saved_state is not None:
                self.server_optimizer.load_state_dict(self._saved_state)
                self._saved_state = None
        elif layout != self._layout:
            raise ValueError("the model's variables changed names or shapes between central "
                             "steps; the server optimizer holds the first layout")
        return self.server_optimizer

    def _accumulator(self, statistics: GMAStatistics, device: torch.device) -> Accumulator:
        """An ``Accumulator`` holding the cohort's sums (its buffer's documented layout:
        ``S``, ``C``, ``Σp``, K)."""
        layout = self._layout
        expected = set(layout.names) | {SIGN_PREFIX + n for n in layout.names} | {USERS_KEY}
        if set(statistics.keys()) != expected:
            missing = sorted(expected - set(statistics.keys()))
            extra = sorted(set(statistics.keys()) - expected)
            raise ValueError(f"the aggregated statistics do not match the model (missing: "
                             f"{missing}, unexpected: {extra})")
        acc = Accumulator(layout.numel, device=device, backend=self.backend,
                          weighted_agreement=self.mask_config.weighted_agreement)
        totals, counts = layout.views(acc.total), layout.views(acc.count)
        for name in layout.names:
            totals[name].copy_(_tensor(statistics[name]))
            counts[name].copy_(_tensor(statistics[SIGN_PREFIX + name]))
        acc.buffer[-2] = float(statistics.weight)
        acc.buffer[-1] = _tensor(statistics[USERS_KEY]).reshape(())
        return acc

    # ----------------------------------------------------------------- checkpoints

    def save(self, dir_path: str) -> None:
        super().save(dir_path)
        if self.server_optimizer is not None:
            torch.save(self.server_optimizer.state_dict(), os.path.join(dir_path, _STATE_FILE))

    def load(self, dir_path: str) -> None:
        super().load(dir_path)
        path = os.path.join(dir_path, _STATE_FILE)
        if os.path.exists(path):
            state = torch.load(path, weights_only=True)
            if self.server_optimizer is None:
                self._saved_state = state  # loaded at the first step, once the size is known
            else:
                self.server_optimizer.load_state_dict(state)


def _tensor(value: Any) -> Tensor:
    """A statistics entry as a float32 tensor (pfl hands tensors; NumPy after some reductions)."""
    return torch.as_tensor(value, dtype=torch.float32)
