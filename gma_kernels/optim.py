"""Stateful server optimizers with GMA: SGD, momentum (FedAvgM), Adam, Yogi, Adagrad."""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor

from . import dispatch
from .batch import Updates, Weights, check_params, make_batch
from .config import (NONFINITE_POLICIES, GMAStats, MaskConfig, MaskKind, NonFinitePolicy,
                     OptimizerKind, Placement, StepConfig, _check_choice)
from .job import Job
from .streaming import Accumulator, step_from


class ServerOptimizer:
    """Steps a flat float32 parameter buffer with the GMA pseudo-gradient, in place.

    ``step(updates, weights)`` runs the whole aggregation and the optimizer's state update in one
    fused pass (on GPU). State (``v`` for momentum; ``m``, ``v`` for adam/yogi/adagrad) starts
    at zero and is saved with ``state_dict()``, with ``steps_taken`` (the ``t`` of Adam's
    ``bias_correction``).

    Example::

        opt = ServerOptimizer(flat.buffer, "adam", lr=0.01, tau=0.4)
        stats = opt.step([u1, u2, u3], weights=[120, 80, 200])
    """

    def __init__(self, params: Tensor, kind: OptimizerKind = "sgd", *, lr: float = 1.0,
                 momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3,
                 mask_placement: Placement = "before", bias_correction: bool = False,
                 tau: float = 0.4, mask: MaskKind = "soft", weighted_agreement: bool = False,
                 rescale: bool = False, backend: str = "auto",
                 nonfinite: NonFinitePolicy = "raise") -> None:
        self._setup(params, StepConfig(kind, lr, momentum, beta1, beta2, eps, mask_placement,
                                       bias_correction),
                    MaskConfig(tau, mask, weighted_agreement, rescale), backend, nonfinite)

    @classmethod
    def from_configs(cls, params: Tensor, step: StepConfig, mask: MaskConfig, *,
                     backend: str = "auto", nonfinite: NonFinitePolicy = "raise"
                     ) -> ServerOptimizer:
        """The optimizer for ready-made configs (what a framework integration holds), with the
        same checks as the constructor."""
        for name, value, kind in (("step", step, StepConfig), ("mask", mask, MaskConfig)):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        opt = cls.__new__(cls)
        opt._setup(params, step, mask, backend, nonfinite)
        return opt

    def _setup(self, params: Tensor, step: StepConfig, mask: MaskConfig, backend: str,
               nonfinite: NonFinitePolicy) -> None:
        self.step_config, self.mask_config = step, mask
        if mask.rescale and step.masks_step:
            raise ValueError("rescale=True needs mask_placement='before' (the density rescale "
                             "applies to the masked average the optimizer sees)")
        check_params(params)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        _check_choice("backend", backend, dispatch.BACKENDS)
        self.params = params
        self.states = tuple(torch.zeros_like(params) for _ in range(step.state_count))
        self.backend = backend
        self.nonfinite = nonfinite
        self.steps_taken = 0

    def step(self, updates: Updates, weights: Weights = None) -> GMAStats:
        """Aggregate the clients' updates with GMA and step ``params`` (and state) in place."""
        batch = make_batch(updates, weights)
        check_params(self.params, batch)
        job = Job(batch, self.mask_config, self._next_step(), self.params, self.states)
        stats = dispatch.execute(job, nonfinite=self.nonfinite, backend=self.backend)
        self.steps_taken += 1
        return stats

    def _next_step(self) -> StepConfig:
        """The step config of the coming step (``StepConfig.at_step``)."""
        return self.step_config.at_step(self.steps_taken + 1)

    def step_accumulated(self, accumulator: Accumulator) -> GMAStats:
        """Step from a streaming accumulator's sums instead of a batch of updates."""
        if not isinstance(accumulator, Accumulator):
            raise TypeError(f"step_accumulated takes an Accumulator, got "
                            f"{type(accumulator).__name__} (for a list of updates use step)")
        device = accumulator.buffer.device
        if accumulator.numel != self.params.numel() or device != self.params.device:
            raise ValueError(f"accumulator holds {accumulator.numel} elements on {device}; "
                             f"params has {self.params.numel()} on {self.params.device}")
        stats = step_from(accumulator, config=self._next_step(), mask=self.mask_config,
                          params=self.params, states=self.states,
                          guard=self.nonfinite != "unchecked", backend=self.backend)
        self.steps_taken += 1
        return stats

    def state_dict(self) -> dict:
        return {"config": asdict(self.step_config), "states": [s.clone() for s in self.states],
                "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        """Restore state saved by ``state_dict`` (same optimizer kind and size, finite values);
        anything else raises ValueError with the state left as it was."""
        config = state.get("config") if isinstance(state, dict) else None
        saved = state.get("states") if isinstance(state, dict) else None
        if not isinstance(config, dict) or not isinstance(saved, (list, tuple)) \
                or not all(isinstance(t, Tensor) for t in saved):
            raise ValueError("not an optimizer state: state_dict() returns {'config': {...}, "
                             "'states': [tensors]}")
        if config.get("kind") != self.step_config.kind:
            raise ValueError(f"state is for optimizer {config.get('kind')!r}, "
                             f"this one is {self.step_config.kind!r}")
        if len(saved) != len(self.states) or any(s.shape != t.shape for s, t in zip(saved, self.states)):
            raise ValueError("saved optimizer state does not match the parameter buffer's size")
        if not all(bool(torch.isfinite(t).all()) for t in saved):
            raise ValueError("saved optimizer state holds non-finite values (NaN or inf)")
        taken = state.get("steps_taken", 0)
        if isinstance(taken, bool) or not isinstance(taken, int) or taken < 0:
            raise ValueError(f"saved steps_taken must be an integer >= 0, got {taken!r}")
        for target, source in zip(self.states, saved):
            target.copy_(source)
        self.steps_taken = taken
