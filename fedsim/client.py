"""Local training of a cohort of clients: the round's clients as rows of one ``[C, N]`` matrix.

A ``Cohort`` is up to ``cohort_size`` of a round's clients. Its parameters are one float32
matrix ``P`` (row k: client k's flat parameters, every model tensor a ``[C, *shape]`` view) and
its gradients another, ``G``. Two engines train it and give the same answer to float32
rounding on the same batches:

* ``CohortTrainer`` (``--engine cohort``): each local step is one batched forward of every
  client's batch (``[C, B, ...]`` inputs; layer by layer, ``fedsim.batched``, for a chain of
  common layers such as the MLP and the CNN, else ``torch.func.functional_call`` under
  ``torch.func.vmap``), one backward of ``Σ_k L_k`` (client k's mean loss on its batch),
  which leaves every client's gradient in ``G``, and one in-place SGD step
  ``P ← P − η (G ⊙ a)`` with ``a_k = 1`` while client k still has steps to take, else 0
  (the MLP's plain steps are taken inside its backward instead, ``_descend``);
* ``SequentialTrainer`` (``--engine sequential``): the clients one after another on one
  reusable model (row k copied in, trained, copied out).

Batches: client k's examples are shuffled by its own ``client_generator(seed, round, k)``, one
permutation per pass over its data, cut into batches of ``batch_size`` (the last one short);
it takes ``local_steps`` batches, or ``local_epochs`` passes. A cohort pads every batch to
the cohort's widest one (at most ``batch_size``) with per-example weights ``1/b`` (``b``: the
batch's real size) and 0 for the padding, and pads the clients that have fewer steps with
steps of weight 0 that do not move them (``a_k = 0``; proximal terms and control variates
included).

Memory of a cohort of C clients and N parameters: ``P`` and ``G`` (``2 C N`` floats), the
step's gradients (``C N``) and the activations of ``C × batch_size`` examples
(``footprint_bytes``); algorithms may add a few ``C N`` matrices (FedGA's gradients,
SCAFFOLD's corrections).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gma_kernels import FlatLayout, FlatParams

from .batched import chain_forward, chain_gradient, chain_of

#: ``hook(grads, params, rows)``: may edit the gradients ``grads`` ([c, N], rows ``rows`` of
#: the cohort, whose parameters are ``params``) before each local step
GradHook = Callable[[Tensor, Tensor, slice], None]
#: ``loss(logits, labels, weight)``: each client's loss (``[c]``) on its batch from the logits
#: (``[c, b, K]``), labels (``[c, b]``) and example weights (``[c, b]``: ``1/b``, 0 for
#: padding), in place of the default ``weighted_cross_entropy`` (no by-hand MLP gradient then)
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
ENGINES: tuple[str, ...] = ("auto", "cohort", "sequential")


def client_generator(seed: int, round_: int, client_id: int,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that shuffles client ``client_id``'s batches in round ``round_`` of the run
    seeded ``seed``: a pure function of the three (``numpy.random.SeedSequence`` mixes them),
    so a client's batches do not depend on which clients trained before it, on which rank
    trains it, or on the engine."""
    state = np.random.SeedSequence([seed, round_, client_id]).generate_state(1, dtype=np.uint64)
    return torch.Generator(device).manual_seed(int(state[0]))


class ClientData:
    """Every client's examples in one pair of tensors, so that a cohort's batch is one gather:
    ``x`` (``[n, ...]``) and ``y`` (``[n]``), client k holding rows ``offsets[k]:offsets[k+1]``.
    Clients that are already consecutive views of one tensor (``load_data`` makes them so) are
    used in place; otherwise they are concatenated once."""

    def __init__(self, clients: Sequence[tuple[Tensor, Tensor]]) -> None:
        if not clients:
            raise ValueError("no clients")
        self.sizes = [len(y) for _, y in clients]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.x = _joined([x for x, _ in clients])
        self.y = _joined([y for _, y in clients])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.x[a:b], self.y[a:b]

    @property
    def device(self) -> torch.device:
        return self.x.device


def _joined(parts: Sequence[Tensor]) -> Tensor:
    """The parts as one tensor: a view of their storage when they lie in it one after another
    (contiguous), else their concatenation."""
    first, position = parts[0], parts[0].storage_offset()
    for p in parts:
        if not p.is_contiguous() or p.storage_offset() != position \
                or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return torch.cat(list(parts))
        position += p.numel()
    shape = (sum(len(p) for p in parts), *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


def local_steps_of(size: int, batch_size: int, local_epochs: int, local_steps: int | None) -> int:
    """Local SGD steps of a client of ``size`` examples: ``local_steps``, else ``local_epochs``
    passes of ``⌈size / batch_size⌉`` batches."""
    return local_steps or local_epochs * math.ceil(size / batch_size)


@dataclass
class Plan:
    """A cohort's batches, step by step: ``index[s, k, i]`` is the position (in
    ``ClientData``) of example i of client k's batch at step s, ``weight[s, k, i]`` its weight
    in the client's mean loss (``1/b``, 0 for padding), ``active[s, k]`` whether client k takes
    step s; ``steps[k]`` its number of steps."""

    index: Tensor
    weight: Tensor
    active: Tensor
    steps: list[int]
    counts: list[list[int]] = field(repr=False)  # real batch sizes [S][C] (host)

    def batch(self, s: int) -> tuple[Tensor, Tensor]:
        """Step ``s``'s ``index`` and ``weight`` (``[C, b]``), cut to its largest real batch
        ``b``: a short step (the last batch of an epoch, a round of small clients) computes
        no padding beyond it (each batch's real examples come first)."""
        b = max(self.counts[s])
        return self.index[s, :, :b], self.weight[s, :, :b]


def shuffled_plan(data: ClientData, ids: Sequence[int], generators: Sequence[torch.Generator],
                  batch_size: int, steps: Sequence[int]) -> Plan:
    """Client ``ids[j]`` takes ``steps[j]`` batches of its examples, one permutation drawn from
    ``generators[j]`` per pass (as many passes as the steps need), each pass cut into batches of
    ``batch_size`` with a short last one."""
    perms, pieces = [], []
    for k, gen, count in zip(ids, generators, steps):
        n = data.sizes[k]
        passes = math.ceil(count / math.ceil(n / batch_size))
        perms += [torch.randperm(n, generator=gen, device=gen.device) for _ in range(passes)]
        pieces.append((n, passes, count))
    return _plan(data, ids, torch.cat(perms), pieces, batch_size, steps)


def full_pass_plan(data: ClientData, ids: Sequence[int], chunk: int) -> Plan:
    """Every example of every client once, in order, in chunks of ``chunk``, each example
    weighted ``1/n_k``: the weighted sum is client k's mean loss over all its data."""
    sizes = [data.sizes[k] for k in ids]
    steps = [math.ceil(n / chunk) for n in sizes]
    order = torch.cat([torch.arange(n, device=data.device) for n in sizes])
    pieces = [(n, 1, count) for n, count in zip(sizes, steps)]
    return _plan(data, ids, order, pieces, chunk, steps, over_client=True)


def _plan(data: ClientData, ids: Sequence[int], order: Tensor, pieces: list[tuple[int, int, int]],
          batch_size: int, steps: Sequence[int], *, over_client: bool = False) -> Plan:
    """The ``Plan`` of clients whose examples come in ``order`` (local positions): piece
    ``(n, passes, count)`` is client ``ids[j]``'s (the j-th piece) ``passes`` passes over its
    ``n`` examples, cut into batches of ``batch_size``, of which it takes the first ``count``.
    The layout is worked out on the host (NumPy, vectorized over the clients) and applied with
    one scatter (in NumPy on a CPU, else on the device). Each example weighs ``1/b`` (its
    batch's mean) or, ``over_client``, ``1/n_k`` (its client's)."""
    c, total = len(ids), max(steps)
    n, passes, count = np.array(pieces, dtype=np.int64).T
    width = min(batch_size, max(p[0] for p in pieces))
    length = passes * n  # positions of each client in ``order``
    owner = np.repeat(np.arange(c), length)  # the client (cohort row) of each position
    i = np.arange(int(length.sum())) - (np.cumsum(length) - length)[owner]  # within the client
    size = n[owner]
    step = (i // size) * -(-size // batch_size) + (i % size) // batch_size  # pass, then batch
    take = np.flatnonzero(step < count[owner])
    owner, step = owner[take], step[take]
    slot = (step * c + owner) * width + (i[take] % size[take]) % batch_size
    offset = np.asarray(data.offsets, dtype=np.int64)[np.asarray(ids)][owner]
    counts = np.bincount(step * c + owner, minlength=total * c).reshape(total, c)
    per = np.broadcast_to(1.0 / n, (total, c)) if over_client else 1.0 / np.maximum(counts, 1)
    valid = np.zeros(total * c * width, dtype=bool)
    valid[slot] = True
    weight = valid.reshape(total, c, width) * per.astype(np.float32)[..., None]
    device = data.device
    if device.type == "cpu":  # the scatter in NumPy, on the tensors' own memory
        index = np.zeros(valid.size, dtype=np.int64)
        index[slot] = order.numpy()[take] + offset
        index = torch.from_numpy(index)
    else:
        take_t, slot_t, offset_t = (torch.from_numpy(a).to(device) for a in (take, slot, offset))
        index = torch.zeros(valid.size, dtype=torch.int64, device=device)
        index[slot_t] = order[take_t] + offset_t
    return Plan(index.view(total, c, width), torch.from_numpy(weight).to(device),
                torch.from_numpy(counts > 0).to(device), list(steps), counts.tolist())


@dataclass
class Cohort:
    """Clients ``ids`` of one round trained together from the global parameters
    ``global_params`` (``w``, read only): ``params`` (``[C, N]``, row k client ``ids[k]``)
    starts at ``w``; after local training ``steps[k]`` is the steps client k took and, when
    asked for (``train(last_gradient=True)``), ``grads`` holds its last step's gradient
    (hooks included). ``generators[k]`` shuffles client
    ``ids[k]``'s batches."""

    ids: list[int]
    sizes: list[int]
    global_params: Tensor
    params: Tensor
    grads: Tensor
    generators: list[torch.Generator]
    steps: list[int] = field(default_factory=list)
    _as_updates: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def updates(self) -> Tensor:
        """``Δ_k = y_k − w`` for every client, as a ``[C, N]`` matrix made in place of
        ``params`` (which then no longer holds ``y_k``); the same matrix on later calls."""
        if not self._as_updates:
            self.params.sub_(self.global_params)
            self._as_updates = True
        return self.params


class Trainer:
    """What both engines share: the hyperparameters of local SGD, the model's flat layout and
    the reusable ``[cohort_size, N]`` buffers of parameters and gradients."""

    def __init__(self, model: nn.Module, data: ClientData, *, lr: float, batch_size: int,
                 local_epochs: int, local_steps: int | None = None, weight_decay: float = 0.0,
                 cohort_size: int = 1) -> None:
        self.model = model.train()  # the trainer's own copy: always in training mode
        self.data = data
        self.layout = FlatLayout.of(dict(model.named_parameters()))
        self.lr, self.weight_decay = lr, weight_decay
        self.batch_size, self.local_epochs, self.local_steps = batch_size, local_epochs, local_steps
        self.cohort_size = cohort_size
        n = self.layout.numel
        device = next(model.parameters()).device
        self._params = torch.empty(cohort_size, n, device=device)
        self._grads = torch.zeros(cohort_size, n, device=device)

    def cohort(self, ids: Sequence[int], global_params: Tensor,
               generators: Sequence[torch.Generator]) -> Cohort:
        """Clients ``ids`` (at most ``cohort_size``), every row of ``params`` set to ``w``."""
        c = len(ids)
        if not 1 <= c <= self.cohort_size:
            raise ValueError(f"a cohort holds 1 to {self.cohort_size} clients, got {c}")
        params = self._params[:c]
        params.copy_(global_params.expand(c, -1))
        return Cohort(list(ids), [self.data.sizes[k] for k in ids], global_params, params,
                      self._grads[:c], list(generators))

    def train(self, cohort: Cohort, hook: GradHook | None = None, *, loss: LossFn | None = None,
              steps: int | None = None, last_gradient: bool = False) -> Tensor:
        """Local SGD of every client of ``cohort`` from its ``params`` on ``loss`` (default:
        cross-entropy; ``steps`` overrides the configured steps); returns each client's mean
        loss over its steps (``[C]``).
        ``last_gradient``: leave each client's last step's gradient (hook included) in
        ``grads`` (else ``grads`` is scratch space)."""
        counts = [steps or local_steps_of(n, self.batch_size, self.local_epochs, self.local_steps)
                  for n in cohort.sizes]
        plan = shuffled_plan(self.data, cohort.ids, cohort.generators, self.batch_size, counts)
        cohort.steps = counts
        return self._descend(cohort, plan, hook, last_gradient, loss)

    def full_gradient(self, cohort: Cohort, chunk: int = 1024) -> Tensor:
        """``∇f_k`` at ``params`` over all of each client's data (mean loss, weight decay
        included), read in chunks of ``chunk`` examples per client; left in ``grads`` and
        returned (``[C, N]``)."""
        plan = full_pass_plan(self.data, cohort.ids, min(chunk, max(cohort.sizes)))
        self._accumulate(cohort, plan)
        return add_weight_decay(cohort.grads, cohort.params, self.weight_decay)

    def _descend(self, cohort: Cohort, plan: Plan, hook: GradHook | None,
                 last_gradient: bool, loss: LossFn | None) -> Tensor:
        raise NotImplementedError

    def _accumulate(self, cohort: Cohort, plan: Plan) -> None:
        raise NotImplementedError


class CohortTrainer(Trainer):
    """Trains a cohort as one batched model (``fedsim.batched``, else ``torch.func.vmap`` over
    the clients)."""

    def __init__(self, model: nn.Module, data: ClientData, **settings) -> None:
        super().__init__(model, data, **settings)
        for p in model.parameters():
            p.requires_grad_(False)  # the template: its own tensors are never trained
        chain = chain_of(model)
        self._forward = chain_forward(chain) if chain else \
            vmap(lambda p, x: functional_call(model, p, (x,)))
        self._gradient = chain_gradient(chain) if chain else None  # by hand, where it applies

    def _leaves(self, cohort: Cohort) -> dict[str, Tensor]:
        """The model's tensors as ``[C, *shape]`` views of ``params`` (autograd leaves)."""
        return {name: view.requires_grad_() for name, view in self._views(cohort.params).items()}

    def _views(self, matrix: Tensor) -> dict[str, Tensor]:
        """The model's tensors as ``[C, *shape]`` views of a ``[C, N]`` matrix."""
        c = matrix.shape[0]
        return {s.name: matrix[:, s.offset:s.stop].view(c, *s.shape) for s in self.layout.segments}

    def _examples(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The inputs (``[C, b, ...]``) and labels (``[C, b]``) at positions ``index``."""
        flat = index.reshape(-1)
        x, y = self.data.x.index_select(0, flat), self.data.y.index_select(0, flat)
        return x.view(*index.shape, *x.shape[1:]), y.view(index.shape)

    def _losses(self, leaves: dict[str, Tensor], index: Tensor, weight: Tensor,
                loss: LossFn | None = None) -> Tensor:
        """Each client's ``loss`` on its batch (default ``L_k = Σ_i w_ki CE(x_ki, y_ki)``)."""
        x, y = self._examples(index)
        return (loss or weighted_cross_entropy)(self._forward(leaves, x), y, weight)

    def _gradients(self, leaves: dict[str, Tensor], losses: Tensor) -> tuple[Tensor, ...]:
        with warnings.catch_warnings():  # the views are strided by N: autograd says so
            warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
            return torch.autograd.grad(losses.sum(), list(leaves.values()))

    def _descend(self, cohort: Cohort, plan: Plan, hook: GradHook | None,
                 last_gradient: bool, loss: LossFn | None) -> Tensor:
        """The local steps (``chain_gradient`` only for the default loss). A step that every
        client takes with no hook steps each model tensor from its fresh gradient: with
        autograd, ``grads`` is written only at some client's last step, and only for
        ``last_gradient``; with ``chain_gradient``, without weight decay and before the last
        step asked for, the step is taken inside its backward.
        Otherwise the step works on ``grads`` in place (``chain_gradient`` writes its gradients
        straight into it). A step some clients sit out works on a scratch matrix and keeps
        their rows of ``grads`` (their last step's gradient) and of ``params`` as they are."""
        params, grads, rows = cohort.params, cohort.grads, slice(None)
        by_hand = self._gradient is not None and loss is None
        leaves = self._views(params) if by_hand else self._leaves(cohort)
        param_views, grad_views = list(leaves.values()), self._views(grads)
        scratch = scratch_views = None
        total = torch.zeros(len(cohort), device=params.device)
        everyone = [all(row) for row in plan.counts]  # host numbers: no device sync
        last = {n - 1 for n in plan.steps} if last_gradient else set()
        for s in range(plan.index.shape[0]):
            index, weight = plan.batch(s)
            plain = everyone[s] and hook is None  # a step every client takes, no hook
            if by_hand and plain and not self.weight_decay and s not in last:
                # the step inside the backward: no gradient written
                with torch.no_grad():
                    total.add_(self._gradient(leaves, None, *self._examples(index), weight,
                                              lr=self.lr))
                continue
            if not by_hand:
                losses = self._losses(leaves, index, weight, loss)
                fresh = self._gradients(leaves, losses)
                if plain:
                    with torch.no_grad():
                        for p, g, view in zip(param_views, fresh, grad_views.values()):
                            sgd_step(p, g, lr=self.lr, weight_decay=self.weight_decay)
                            if s in last:
                                view.copy_(g)
                        total.add_(losses.detach())
                    continue
            if everyone[s]:
                target, views, active = grads, grad_views, None
            else:
                if scratch is None:
                    scratch = torch.empty_like(grads)
                    scratch_views = self._views(scratch)
                target, views = scratch, scratch_views
                active = plan.active[s, :, None].to(params.dtype)
            with torch.no_grad():
                if by_hand:
                    losses = self._gradient(leaves, views, *self._examples(index), weight)
                else:
                    for view, g in zip(views.values(), fresh):
                        view.copy_(g)
                sgd_step(params, target, lr=self.lr, weight_decay=self.weight_decay, hook=hook,
                         rows=rows, active=active)
                if everyone[s]:
                    total.add_(losses.detach())
                else:  # the clients that sat it out keep their last step's gradient
                    torch.where(plan.active[s, :, None], scratch, grads, out=grads)
                    total.add_(losses.detach() * plan.active[s])
        return total.div_(torch.tensor(plan.steps, dtype=total.dtype, device=total.device))

    def _accumulate(self, cohort: Cohort, plan: Plan) -> None:
        leaves, views = self._leaves(cohort), self._views(cohort.grads).values()
        cohort.grads.zero_()
        for s in range(plan.index.shape[0]):
            losses = self._losses(leaves, *plan.batch(s))
            for view, g in zip(views, self._gradients(leaves, losses)):
                view.add_(g)


class SequentialTrainer(Trainer):
    """Trains a cohort's clients one after another on one reusable model whose parameters and
    gradients are two flat buffers: each step is one forward, one backward and one update of
    the whole buffer."""

    def __init__(self, model: nn.Module, data: ClientData, **settings) -> None:
        super().__init__(model, data, **settings)
        self.flat = FlatParams(model)
        self.grad = torch.zeros_like(self.flat.buffer)
        for p, g in zip(model.parameters(), self.flat.layout.views(self.grad).values()):
            p.grad = g  # autograd accumulates into these views, in place

    def _client_batches(self, plan: Plan, j: int) -> list[tuple[Tensor, Tensor]]:
        """Client j's real batches (padding cut off), step by step."""
        return [(self.data.x[plan.index[s, j, :b]], self.data.y[plan.index[s, j, :b]])
                for s, b in enumerate(row[j] for row in plan.counts) if b]

    def _descend(self, cohort: Cohort, plan: Plan, hook: GradHook | None,
                 last_gradient: bool, loss: LossFn | None) -> Tensor:
        losses = []
        for j in range(len(cohort)):
            rows = slice(j, j + 1)
            self.flat.copy_(cohort.params[j])
            total = torch.zeros((), device=self.grad.device)
            for xb, yb in self._client_batches(plan, j):
                self.grad.zero_()
                logits = self.model(xb)
                value = F.cross_entropy(logits, yb) if loss is None else \
                    loss(logits[None], yb[None], torch.full((1, len(yb)), 1 / len(yb),
                                                            device=yb.device))[0]
                value.backward()
                with torch.no_grad():
                    sgd_step(self.flat.buffer[None], self.grad[None], lr=self.lr,
                             weight_decay=self.weight_decay, hook=hook, rows=rows)
                total += value.detach()
            cohort.params[j].copy_(self.flat.buffer)
            if last_gradient:
                cohort.grads[j].copy_(self.grad)
            losses.append(total / plan.steps[j])
        return torch.stack(losses)

    def _accumulate(self, cohort: Cohort, plan: Plan) -> None:
        for j in range(len(cohort)):
            self.flat.copy_(cohort.params[j])
            self.grad.zero_()
            n = cohort.sizes[j]
            for xb, yb in self._client_batches(plan, j):
                (F.cross_entropy(self.model(xb), yb, reduction="sum") / n).backward()
            cohort.grads[j].copy_(self.grad)


def add_weight_decay(grads: Tensor, params: Tensor, weight_decay: float) -> Tensor:
    """``g ← g + λ θ`` in place (the gradient of ``L + λ/2 ‖θ‖²``); returns ``g``."""
    if weight_decay:
        grads.add_(params, alpha=weight_decay)
    return grads


def sgd_step(params: Tensor, grads: Tensor, *, lr: float, weight_decay: float,
             hook: GradHook | None = None, rows: slice = slice(None),
             active: Tensor | None = None) -> None:
    """The local SGD step, in place: ``g ← g + λ θ``, then ``hook(g, θ, rows)`` if given,
    then ``θ ← θ − η g``, or ``θ ← θ − η (g ⊙ a)`` with ``active`` ``a`` (1 for the clients
    that take this step, 0 for those that sit it out). ``g`` keeps ``g + λ θ`` (the gradient
    that algorithms read back)."""
    add_weight_decay(grads, params, weight_decay)
    if hook is not None:
        hook(grads, params, rows)
    if active is None:
        params.add_(grads, alpha=-lr)
    else:
        params.addcmul_(grads, active, value=-lr)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """``L_k = Σ_i w_ki CE(z_ki, y_ki)`` (``[c]``) from logits ``[c, b, K]``, labels and
    weights ``[c, b]``."""
    c, b = labels.shape
    ce = F.cross_entropy(logits.reshape(c * b, -1), labels.reshape(-1), reduction="none")
    return (ce.view(c, b) * weight).sum(1)


def resolve_engine(engine: str, model: nn.Module, input_shape: tuple[int, ...],
                   device: torch.device) -> str:
    """The engine ``auto`` stands for: the cohort engine, except on a CPU for a model with
    convolutions on inputs of 16×16 or more that is not a chain of common layers
    (``fedsim.batched``): under ``vmap`` (the ResNet) its convolutions have not been measured
    faster than one client's at a time. Chain models (fedsim's CNN) train as a cohort there
    too, in cohorts small enough for the CPU's caches (``CPU_ACTIVATION_BUDGET``)."""
    if engine != "auto":
        return engine
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if device.type == "cpu" and convolutional and min(input_shape[-2:]) >= 16 \
            and chain_of(model) is None:
        return "sequential"
    return "cohort"


def build_trainer(engine: str, model: nn.Module, data: ClientData, **settings) -> Trainer:
    """The trainer of ``engine`` (``cohort`` or ``sequential``) on ``model`` (a copy the
    trainer owns) and the clients' ``data``."""
    if engine not in ("cohort", "sequential"):
        raise ValueError(f"unknown engine {engine!r}; valid: cohort, sequential "
                         "(resolve_engine turns auto into one of them)")
    cls = SequentialTrainer if engine == "sequential" else CohortTrainer
    return cls(model, data, **settings)


#: On a CPU, at most this many bytes of one batch's forward activations in a cohort: beyond it
#: the batched layers leave the caches and a cohort runs slower than one client at a time
#: (measured in docs/fedsim-engines.md, "CNNs")
CPU_ACTIVATION_BUDGET = 64 << 20


def client_footprint(model: nn.Module, input_shape: tuple[int, ...],
                     batch_size: int) -> tuple[int, int]:
    """(parameters, forward activations of one batch) of one client, in floats: the outputs of
    every module on one example, times ``batch_size`` (every output grows with the batch),
    measured by a forward in inference mode with every module in eval mode (no random numbers
    drawn, no buffer updated; each module's mode is put back)."""
    n = sum(p.numel() for p in model.parameters())
    sizes: list[int] = []
    modes = [(m, m.training) for m in model.modules()]
    hooks = [m.register_forward_hook(
        lambda _m, _i, out: sizes.append(out.numel() if isinstance(out, Tensor) else 0))
        for m, _ in modes]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    return n, batch_size * sum(sizes)


def footprint_bytes(params: int, activations: int) -> int:
    """A client's bytes in a cohort: its rows of the parameter, gradient and step-gradient
    matrices plus two more for an algorithm's extras (``5 N`` floats), and three times the
    activations of one batch (forward outputs kept for backward, their gradients, and the
    batched convolutions' copies)."""
    return 4 * (5 * params + 3 * activations)
