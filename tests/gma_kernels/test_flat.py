"""FlatParams / FlatLayout / flatten / unflatten: one buffer, views back into it, round trips."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gma_kernels as gk
import reference as ref
from gk_util import DEVICE, assert_close, data_scale, gen, make


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                         nn.LayerNorm(5)).to(DEVICE)


def _named(seed, device=DEVICE):
    g = gen(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g).to(device),
            "conv.bias": torch.randn(4, generator=g).to(device),
            "scalar": torch.randn((), generator=g).to(device),
            "fc.weight": torch.randn(5, 7, generator=g).to(device)}


def test_flatten_unflatten_round_trip():
    tensors = _named(1)
    flat, layout = gk.flatten(tensors)
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.is_contiguous()
    assert layout.numel == flat.numel() == sum(t.numel() for t in tensors.values())
    assert layout.names == tuple(tensors)
    back = gk.unflatten(flat, layout)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].shape == t.shape and torch.equal(back[name], t)
        # copies, not views of the buffer
        assert back[name].data_ptr() != flat[layout.offset_of(name)].data_ptr() or t.numel() == 0
    # the order of the buffer is the order of the mapping
    expected = torch.cat([t.reshape(-1) for t in tensors.values()])
    assert torch.equal(flat, expected)
    back["conv.bias"].fill_(99.0)
    assert not torch.equal(flat, torch.full_like(flat, 99.0)) and 99.0 not in flat.tolist()


def test_flatten_converts_dtype_and_reads_noncontiguous():
    g = gen(2)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    tensors = {"t": base.t(), "h": torch.randn(5, generator=g).half(), "s": base[::2, 1]}
    assert not tensors["t"].is_contiguous()
    flat, layout = gk.flatten(tensors)
    assert flat.dtype == torch.float32
    views = layout.views(flat)
    assert torch.equal(views["t"], base.t().float())
    assert torch.equal(views["h"], tensors["h"].float())
    assert torch.equal(views["s"], base[::2, 1].float())


def test_flatten_to_device_argument():
    flat, _ = gk.flatten(_named(3, "cpu"), device=DEVICE)
    assert flat.device.type == DEVICE.type


def test_offset_of_and_views():
    tensors = _named(4)
    flat, layout = gk.flatten(tensors)
    offsets = [0, 4 * 27, 4 * 27 + 4, 4 * 27 + 4 + 1]
    assert [layout.offset_of(n) for n in tensors] == offsets
    views = layout.views(flat)
    for name, v in views.items():
        assert v.data_ptr() == flat.data_ptr() + 4 * layout.offset_of(name)  # views, no copies
    views["fc.weight"].fill_(-2.0)
    assert torch.equal(flat[offsets[3]:], torch.full((35,), -2.0, device=DEVICE))
    assert torch.equal(flat[:offsets[3]], torch.cat([t.reshape(-1) for t in
                                                     list(tensors.values())[:3]]))
    with pytest.raises(KeyError, match="nope"):
        layout.offset_of("nope")
    with pytest.raises(ValueError, match="flat buffer"):
        layout.views(flat[:-1])
    with pytest.raises(ValueError, match="flat buffer"):
        gk.unflatten(flat.view(1, -1), layout)


def test_flat_params_views_into_one_buffer():
    model = _model(5)
    x = torch.randn(2, 3, 6, 6, generator=gen(5)).to(DEVICE)
    before = model(x)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = gk.FlatParams(model)
    # same values, now views into the buffer
    assert torch.equal(model(x), before)
    assert flat.buffer.numel() == sum(p.numel() for p in model.parameters())
    start, stop = flat.buffer.data_ptr(), flat.buffer.data_ptr() + 4 * flat.buffer.numel()
    for name, p in model.named_parameters():
        assert start <= p.data_ptr() < stop
        assert p.data_ptr() == start + 4 * flat.layout.offset_of(name)
        assert torch.equal(p.detach(), snapshot[name])
    # writing the buffer changes the model; the state dict is a copy
    sd = flat.state_dict()
    flat.buffer.mul_(0.5)
    assert not torch.allclose(model(x), before)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name] * 0.5)
        assert torch.equal(sd[name], snapshot[name])
    # copy_ loads a whole flat buffer
    other = torch.arange(flat.buffer.numel(), dtype=torch.float32, device=DEVICE)
    flat.copy_(other)
    assert torch.equal(flat.buffer, other)
    assert torch.equal(model[3].bias.detach(), other[flat.layout.offset_of("3.bias"):][:5])
    with pytest.raises(ValueError):
        flat.copy_(other[1:])


def test_flat_params_training_still_works_and_grad_buffer():
    model = _model(6)
    flat = gk.FlatParams(model)
    x = torch.randn(3, 3, 6, 6, generator=gen(6)).to(DEVICE)
    assert torch.equal(flat.grad_buffer(), torch.zeros_like(flat.buffer))
    model(x).square().sum().backward()
    grads = flat.grad_buffer()
    for name, p in model.named_parameters():
        o = flat.layout.offset_of(name)
        assert torch.equal(grads[o:o + p.numel()], p.grad.reshape(-1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = flat.buffer.clone()
    opt.step()
    assert torch.allclose(flat.buffer, before - 0.1 * grads)


def test_grad_buffer_zero_where_no_grad():
    model = _model(7)
    model[4].weight.requires_grad_(False)
    flat = gk.FlatParams(model)
    model(torch.randn(1, 3, 6, 6).to(DEVICE)).sum().backward()
    grads = flat.grad_buffer()
    o = flat.layout.offset_of("4.weight")
    assert torch.equal(grads[o:o + 5], torch.zeros(5, device=DEVICE))
    assert grads.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gma_step_on_flat_buffer_updates_the_model(backend):
    model = _model(8)
    flat = gk.FlatParams(model)
    n = flat.buffer.numel()
    start = flat.buffer.clone()
    updates, exact, w = make(8, 4, n, scale=0.01)
    gk.gma_step(flat.buffer, updates, w, lr=1.0, tau=0.5, backend=backend)
    g = ref.masked_mean(exact, w, tau=0.5)
    assert_close(flat.buffer, start.cpu().double() + g, scale=1.0)
    o = flat.layout.offset_of("3.weight")
    assert_close(model[3].weight.reshape(-1), start[o:o + 320].cpu().double() + g[o:o + 320],
                 scale=data_scale(exact) + 1.0)


def test_flat_params_refuses_bad_modules():
    with pytest.raises(ValueError, match="no parameters"):
        gk.FlatParams(nn.ReLU())
    with pytest.raises(TypeError, match="float64"):
        gk.FlatParams(nn.Linear(2, 2).double())


def test_flatten_refuses_empty_and_integer_tensors():
    with pytest.raises(ValueError, match="empty"):
        gk.flatten({})
    with pytest.raises(TypeError, match="'steps'"):
        gk.flatten({"w": torch.ones(2), "steps": torch.ones(2, dtype=torch.int64)})
