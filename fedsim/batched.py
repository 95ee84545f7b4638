"""A cohort's forward pass written out layer by layer, for models that are a chain of common
layers (fedsim's MLP and CNN): every client's copy of the model at once, as a few large calls.

``chain_of(model)`` traces the model (``torch.fx``) and, when every step is a ``Linear``,
``Conv2d``, ``ReLU``, ``LeakyReLU``, ``MaxPool2d`` or ``Flatten`` applied to the previous step's output, returns
that chain of layers, else ``None`` (the cohort engine then uses ``torch.func.vmap``, which
handles any model). ``chain_forward(chain)`` is its ``forward(params, x)``: ``params`` maps
each parameter name to its ``[C, *shape]`` tensor (client k's in row k), ``x`` is
``[C, B, ...]`` and the result ``[C, B, classes]``. It computes what ``vmap`` computes, with
fewer calls and a linear layer whose backward pass writes the weight gradient
in the weights' own layout, so that the SGD step reads both in order (``vmap`` leaves it
transposed, and a strided step costs several times a contiguous one).

``chain_gradient(chain)``, for a chain of ``Linear``, ``ReLU`` and ``Flatten`` only (fedsim's
MLP), goes one step further: the forward pass, the weighted cross-entropy and the backward pass
by hand, without autograd, each weight and bias gradient written straight into the caller's
gradient matrix. On small models (ten 32-example batches of the MLP) autograd's own work is a
sizeable share of a step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

#: ``forward(params, x)``: ``[C, B, ...]`` inputs → ``[C, B, classes]`` logits
ChainForward = Callable[[dict[str, Tensor], Tensor], Tensor]
#: ``gradient(params, grads, x, y, weight, lr=None)``: each client's weighted loss ``[C]``;
#: the gradients written into ``grads``, or the SGD step taken (``chain_gradient``)
ChainGradient = Callable[..., Tensor]
_Layer = Callable[[dict[str, Tensor], Tensor], Tensor]
#: a model's layers in the order its forward applies them, with their names
Chain = list[tuple[str, nn.Module]]


def chain_of(model: nn.Module) -> Chain | None:
    """``model``'s submodules in order, with their names, when its forward applies each to the
    previous one's output (traced with ``torch.fx``) and each has a batched version here, else
    ``None``."""
    try:
        graph = fx.Tracer().trace(model)  # the graph alone: no GraphModule to generate
    except Exception:  # noqa: BLE001 - any model fx cannot trace goes to vmap
        return None
    modules: list[tuple[str, nn.Module]] = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder" and previous is None:
            previous = node
        elif node.op == "call_module" and node.args == (previous,) and not node.kwargs:
            modules.append((node.target, model.get_submodule(node.target)))
            previous = node
        elif node.op == "output" and node.args == (previous,) and modules:
            return modules if all(_layer(n, m) for n, m in modules) else None
        else:
            return None
    return None


def chain_forward(chain: Chain) -> ChainForward:
    """The batched forward of the layers ``chain`` (``chain_of``)."""
    layers = [_layer(name, module) for name, module in chain]

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        for layer in layers:
            x = layer(params, x)
        return x

    return forward


def chain_gradient(chain: Chain) -> ChainGradient | None:
    """``gradient(params, grads, x, y, weight, lr=None)`` of the layers ``chain``
    (``chain_of``) when they are ``Linear``, ``ReLU`` and ``Flatten`` layers only, at least one
    of them linear and none applied twice, else ``None``.

    ``params`` and ``grads`` map each parameter name to a ``[C, *shape]`` tensor, ``x`` is
    ``[C, B, ...]``, ``y`` ``[C, B]`` labels and ``weight`` ``[C, B]`` per-example weights. It
    returns ``L_k = Σ_i weight_ki CE(f_k(x_ki), y_ki)`` (``[C]``) and writes ``∂L_k/∂θ_k`` into
    ``grads``, layer by layer: with ``δ = ∂L/∂(output)`` of a linear layer and ``h`` its input,
    ``∂W = δᵀ h`` (one batched matmul into ``grads``), ``∂b = Σ_i δ_i`` and ``δ ← δ W`` for the
    layer below; a ReLU keeps ``δ`` where its output is positive; the loss's own is
    ``weight_ki (softmax(f_k(x_ki)) − onehot(y_ki))``. With ``lr`` = η it writes no gradient
    (``grads`` unused) and takes the SGD step ``θ ← θ − η ∂θ`` in place instead, inside the
    backward (``W ← W − η δᵀh`` as one batched matmul, after ``δ W`` for the layer below)."""
    if not all(isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten)) for _, m in chain) \
            or len({name for name, _ in chain}) < len(chain):  # a layer applied twice: autograd
        return None
    first = next((i for i, (_, m) in enumerate(chain) if isinstance(m, nn.Linear)), None)
    if first is None:
        return None
    names = {n: (f"{n}.weight", f"{n}.bias" if m.bias is not None else None)
             for n, m in chain if isinstance(m, nn.Linear)}

    def gradient(params: dict[str, Tensor], grads: dict[str, Tensor] | None, x: Tensor,
                 y: Tensor, weight: Tensor, lr: float | None = None) -> Tensor:
        saved: list[Tensor | torch.Size] = []  # what each layer's backward reads
        fresh = False  # whether ``x`` is a linear layer's own output (a ReLU may overwrite it)
        for name, module in chain:
            if isinstance(module, nn.Linear):
                saved.append(x)
                w, b = names[name]
                x = torch.bmm(x, params[w].transpose(1, 2)) if b is None else \
                    torch.baddbmm(params[b].unsqueeze(1), x, params[w].transpose(1, 2))
                fresh = True
            elif isinstance(module, nn.ReLU):
                x = x.relu_() if fresh else x.relu()
                saved.append(x)
            else:
                saved.append(x.shape)
                x = x.flatten(2)
        log_p = torch.log_softmax(x, 2)
        label = y.unsqueeze(2)
        losses = (log_p.gather(2, label).squeeze(2) * weight).sum(1).neg_()
        delta = log_p.exp_().scatter_add_(2, label, torch.full(label.shape, -1.0, dtype=x.dtype,
                                                               device=x.device))
        delta.mul_(weight.unsqueeze(2))
        for i in range(len(chain) - 1, first - 1, -1):
            name, module, kept = *chain[i], saved[i]
            if isinstance(module, nn.Linear):
                w, b = names[name]
                below = torch.bmm(delta, params[w]) if i > first else None  # W before its step
                if lr is None:
                    torch.bmm(delta.transpose(1, 2), kept, out=grads[w])
                    if b is not None:
                        torch.sum(delta, 1, out=grads[b])
                else:
                    params[w].baddbmm_(delta.transpose(1, 2), kept, alpha=-lr)
                    if b is not None:
                        params[b].add_(delta.sum(1), alpha=-lr)
                delta = below
            elif isinstance(module, nn.ReLU):
                delta = torch.ops.aten.threshold_backward.grad_input(delta, kept, 0,
                                                                     grad_input=delta)
            else:
                delta = delta.reshape(kept)
        return losses

    return gradient


def _layer(name: str, module: nn.Module) -> _Layer | None:
    """Module ``name``'s batched version (``[C, B, ...]`` in and out), or ``None``."""
    if isinstance(module, nn.Linear):
        return _linear(f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" \
            and isinstance(module.padding, tuple):
        return _conv2d(module, f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    if isinstance(module, nn.ReLU):
        return lambda _p, x: x.relu()
    if isinstance(module, nn.LeakyReLU):
        return lambda _p, x: F.leaky_relu(x, module.negative_slope)
    if isinstance(module, nn.MaxPool2d):
        def pool(_p: dict[str, Tensor], x: Tensor) -> Tensor:
            out = F.max_pool2d(_stacked(x), module.kernel_size, module.stride, module.padding,
                               module.dilation, module.ceil_mode)
            return _unstacked(out, x.shape[0])
        return pool
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return lambda _p, x: x.flatten(2)
    return None


def _linear(weight: str, bias: str | None) -> _Layer:
    """``y = x Wᵀ + b`` per client (``_BatchedLinear``)."""
    return lambda params, x: _BatchedLinear.apply(x, params[weight], bias and params[bias])


class _BatchedLinear(torch.autograd.Function):
    """``y_k = x_k W_kᵀ + b_k`` for every client k (``x``: ``[C, B, in]``, ``W``:
    ``[C, out, in]``, ``b``: ``[C, out]`` or ``None``). The backward computes
    ``∂W_k = ∂y_kᵀ x_k`` directly in ``W``'s layout (autograd's own rule for ``x Wᵀ`` computes
    ``x_kᵀ ∂y_k`` and hands back its transpose, which makes every later read of it strided)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # noqa: ANN001
        # (``forward(ctx, ...)`` rather than a separate ``setup_context``: autograd then skips
        # binding the arguments by signature, a sizeable share of a small step's time)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        if b is None:
            return torch.bmm(x, w.transpose(1, 2))
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        dx = torch.bmm(dy, w) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dy.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        db = dy.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _conv2d(module: nn.Conv2d, weight: str, bias: str | None) -> _Layer:
    """Client k's convolution on its own batch: one grouped convolution over the clients'
    channels stacked (``_stacked``, ``C·groups`` groups)."""
    def conv(params: dict[str, Tensor], x: Tensor) -> Tensor:
        c, w = x.shape[0], params[weight]
        out = F.conv2d(_stacked(x), w.reshape(c * w.shape[1], *w.shape[2:]),
                       None if bias is None else params[bias].reshape(-1),
                       module.stride, module.padding, module.dilation, c * module.groups)
        return _unstacked(out, c)
    return conv


def _stacked(x: Tensor) -> Tensor:
    """``[C, B, ch, H, W]`` images as ``[B, C·ch, H, W]``: the clients' channels side by side,
    on a CPU channels last (a view when ``x`` came from ``_unstacked``, as between convolutions
    and poolings). Channels last because there a pooling over many small channel planes runs
    an order of magnitude faster so (measured in benchmarks/results/before-after/
    fedsim-cohort.md), and a convolution keeps that layout."""
    c, b, ch = x.shape[:3]
    stacked = x.transpose(0, 1).reshape(b, c * ch, *x.shape[3:])
    if stacked.device.type == "cpu":
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    return stacked


def _unstacked(out: Tensor, c: int) -> Tensor:
    """``[B, C·ch, H, W]`` back to ``[C, B, ch, H, W]`` (a view)."""
    return out.view(out.shape[0], c, -1, *out.shape[2:]).transpose(0, 1)
