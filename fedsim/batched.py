"""A cohort's forward pass written out layer by layer, for models that are a chain of common
layers (fedsim's MLP and CNN): every client's copy of the model at once, as a few large calls.

``chain_forward(model)`` traces the model (``torch.fx``) and, when every step is a ``Linear``,
``Conv2d``, ``ReLU``, ``MaxPool2d`` or ``Flatten`` applied to the previous step's output, returns
``forward(params, x)``: ``params`` maps each parameter name to its ``[C, *shape]`` tensor (client
k's in row k), ``x`` is ``[C, B, ...]`` and the result ``[C, B, classes]``; else ``None`` (the
cohort engine then uses ``torch.func.vmap``, which handles any model). It computes what ``vmap``
computes, with fewer calls and a linear layer whose backward pass writes the weight gradient
in the weights' own layout, so that the SGD step reads both in order (``vmap`` leaves it
transposed, and a strided step costs several times a contiguous one).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

#: ``forward(params, x)``: ``[C, B, ...]`` inputs → ``[C, B, classes]`` logits
ChainForward = Callable[[dict[str, Tensor], Tensor], Tensor]
_Layer = Callable[[dict[str, Tensor], Tensor], Tensor]


def chain_forward(model: nn.Module) -> ChainForward | None:
    """The batched forward of ``model`` when it is a chain of supported layers, else ``None``."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any model fx cannot trace goes to vmap
        return None
    layers: list[_Layer] = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder" and previous is None:
            previous = node
        elif node.op == "call_module" and node.args == (previous,) and not node.kwargs:
            layer = _layer(node.target, model.get_submodule(node.target))
            if layer is None:
                return None
            layers.append(layer)
            previous = node
        elif node.op == "output" and node.args == (previous,) and layers:
            break
        else:
            return None

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        for layer in layers:
            x = layer(params, x)
        return x

    return forward


def _layer(name: str, module: nn.Module) -> _Layer | None:
    """Module ``name``'s batched version (``[C, B, ...]`` in and out), or ``None``."""
    if isinstance(module, nn.Linear):
        return _linear(f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" \
            and isinstance(module.padding, tuple):
        return _conv2d(module, f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    if isinstance(module, nn.ReLU):
        return lambda _p, x: x.relu()
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
    an order of magnitude faster so (2-core CPU, ``[32, 160, 8, 8]``: 0.06 ms against 1.8 ms),
    and a convolution keeps that layout."""
    c, b, ch = x.shape[:3]
    stacked = x.transpose(0, 1).reshape(b, c * ch, *x.shape[3:])
    if stacked.device.type == "cpu":
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    return stacked


def _unstacked(out: Tensor, c: int) -> Tensor:
    """``[B, C·ch, H, W]`` back to ``[C, B, ch, H, W]`` (a view)."""
    return out.view(out.shape[0], c, -1, *out.shape[2:]).transpose(0, 1)
