"""The adapters' shared codec (gma_kernels.integrations.codec): the float layout of a model's
arrays and the rounded weighted mean of its integer and boolean arrays."""
from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from gma_kernels.integrations.codec import ArrayLayout, ArraySpec, rounded_mean


def mixed_arrays(rng) -> list[tuple[str, np.ndarray]]:
    """Floating, integer and boolean arrays of awkward shapes: a scalar, empty arrays, a
    Fortran-ordered one, size-1 axes, and integers between floats."""
    return [
        ("scalar", np.array(0.25, dtype=np.float32)),
        ("steps", np.array(7, dtype=np.int64)),
        ("w16", rng.standard_normal((3, 1, 5)).astype(np.float16)),
        ("empty", np.zeros((0, 4), dtype=np.float32)),
        ("flags", np.array([[True], [False], [True]])),
        ("wf", np.asfortranarray(rng.standard_normal((4, 3)))),
        ("counts", rng.integers(0, 255, (2, 0, 3), dtype=np.uint8)),
        ("w64", rng.standard_normal((1,))),
        ("ids", rng.integers(-50, 50, (2, 3), dtype=np.int32)),
    ]


def test_layout_round_trip_of_mixed_arrays():
    rng = np.random.default_rng(0)
    arrays = mixed_arrays(rng)
    layout = ArrayLayout.of(ArraySpec(name, a.shape, a.dtype) for name, a in arrays)
    floats = [(name, a) for name, a in arrays if a.dtype.kind == "f"]
    assert layout.names == tuple(name for name, _ in arrays)
    assert layout.flat.names == tuple(name for name, _ in floats)
    assert [s.name for s in layout.others] == ["steps", "flags", "counts", "ids"]
    assert layout.numel == sum(a.size for _, a in floats) == 1 + 15 + 0 + 12 + 1
    # the segments tile the buffer in order, with no gap
    offset = 0
    for segment, (_, a) in zip(layout.flat.segments, floats):
        assert (segment.offset, segment.shape) == (offset, a.shape)
        offset = segment.stop
    # pack the floating arrays into one float32 buffer, then read them back
    flat = torch.full((layout.numel,), float("nan"))
    views = layout.flat.views(flat)
    for name, a in floats:
        views[name].copy_(torch.from_numpy(a.copy(order="C")))
    assert bool(torch.isfinite(flat).all())
    back = layout.flat.views(flat)
    for spec, (name, a) in zip(layout.specs, arrays):
        if spec.floating:
            value = back[name].numpy().astype(spec.dtype)
            assert value.shape == a.shape and value.dtype == a.dtype
            np.testing.assert_array_equal(value, a.astype(np.float32).astype(a.dtype))


def test_layout_with_torch_dtypes_and_equality():
    specs = [ArraySpec("w", (2, 3), torch.bfloat16), ArraySpec("n", (), torch.int64),
             ArraySpec("b", (4,), torch.float32)]
    layout = ArrayLayout.of(specs)
    assert [s.floating for s in layout.specs] == [True, False, True]
    assert layout.numel == 10 and layout.flat.offset_of("b") == 6
    assert ArrayLayout.of(specs) == layout
    other = ArrayLayout.of([specs[0], ArraySpec("n", (), torch.int32), specs[2]])
    assert other != layout and other.flat == layout.flat  # a dtype change is a new layout


def test_layout_without_floating_arrays_is_empty():
    layout = ArrayLayout.of([ArraySpec("n", (3,), np.dtype(np.int64))])
    assert layout.numel == 0 and layout.flat.segments == () and len(layout.others) == 1


def test_rounded_mean_against_float64_hand_computation():
    rng = np.random.default_rng(1)
    values = [rng.integers(-1000, 1000, (3, 4), dtype=np.int64) for _ in range(5)]
    weights = [1.0, 4.0, 2.0, 0.5, 0.5]   # sum 8: every product and sum exact in float64
    means = np.zeros((3, 4))
    for i, j in np.ndindex(3, 4):
        means[i, j] = sum(w * float(v[i, j]) for v, w in zip(values, weights)) / 8.0
        assert means[i, j] == sum(Fraction(w) * int(v[i, j]) for v, w in zip(values, weights)) / 8
    got = rounded_mean(values, weights)
    assert got.dtype == np.float64 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, np.rint(means))
    # with a base (the values are updates): base + mean, then rounded
    base = rng.integers(-5, 5, (3, 4))
    np.testing.assert_array_equal(rounded_mean(values, weights, base), np.rint(base + means))


@pytest.mark.parametrize(("values", "weights", "expected"), [
    ([0, 1], [1.0, 1.0], 0.0),       # 0.5: half to even
    ([1, 2], [1.0, 1.0], 2.0),       # 1.5
    ([-1, -2], [1.0, 1.0], -2.0),    # -1.5
    ([1, 2, 4], [1.0, 1.0, 2.0], 3.0),  # 2.75
    ([10, 0], [3.0, 1.0], 8.0),      # 7.5
])
def test_rounded_mean_ties_and_weights(values, weights, expected):
    got = rounded_mean([np.array(v, dtype=np.int32) for v in values], weights)
    assert got.shape == () and float(got) == expected


def test_rounded_mean_of_booleans_and_scalars():
    flags = [np.array([True, False, True]), np.array([True, True, False]),
             np.array([False, False, True])]
    got = rounded_mean(flags, [1.0, 1.0, 2.0])   # means 0.5, 0.25, 0.75
    assert got.astype(bool).tolist() == [False, False, True]
    assert isinstance(rounded_mean([np.int64(3)], [2.0]), np.ndarray)


def test_codec_imports_no_framework():
    code = ("import sys, gma_kernels.integrations.codec; "
            "bad = [m for m in ('flwr', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
