"""The C kernels of lorakern/native/lora_cpu.c called directly (ctypes, NumPy operands) against float64 NumPy
computed here, on the edge classes a mutation audit found the layer-level tests leave unseen: the paths of an
entry point that no Python caller reaches today (dora_backward_f32 without a shift: sum_rows(g z)), and the
row, chunk and thread boundaries of the passes at sizes where they matter. Every ISA level this CPU executes;
each comparison is also shown to fail on a result off by a few times its bound."""
import ctypes

import numpy as np
import pytest
import torch

from lorakern import native
from lorakern.testing import bound

LEVELS = [level.name for level in native.levels_here()]


@pytest.fixture(params=LEVELS)
def library(request):
    level = next(level for level in native.levels_here() if level.name == request.param)
    built = native.lora_library(level)
    if built is None:
        pytest.skip(f"no C library for {level.name}: {native.build_status()}")
    return built


def _p(array):
    """The address a C function takes for a float32 / int64 NumPy array (None: NULL)."""
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def _rand(gen, *shape):
    return gen.standard_normal(shape).astype(np.float32)


def _worst(got, ref, mag, length) -> float:
    """The largest |got - ref| in units of its fp32 bound (length the longest reduction): <= 1 passes."""
    return float(np.max(np.abs(got.astype(np.float64) - ref) / (bound(torch.float32, length) * mag + 1e-30)))


def _assert_close(name, got, ref, mag, length):
    assert _worst(got, ref, mag, length) <= 1.0, (name, _worst(got, ref, mag, length))
    # the same check fails on a result off by four bounds at one element
    bad = got.astype(np.float64).copy()
    at = np.unravel_index(np.argmax(mag), mag.shape)
    bad[at] += 4 * bound(torch.float32, length) * mag[at]
    assert _worst(bad, ref, mag, length) > 1.0, name


def _backward_reference(g, x, A, Bt, s):
    """dx, dA, dB^T of the LoRA backward in float64, and the magnitudes (the same sums on absolute values)."""
    g, x, A, Bt = (t.astype(np.float64) for t in (g, x, A, Bt))
    u, gB = x @ A.T, g @ Bt.T
    mu, mgB = np.abs(x) @ np.abs(A).T, np.abs(g) @ np.abs(Bt).T
    return ({"dx": s * gB @ A, "dA": s * gB.T @ x, "dBt": s * u.T @ g},
            {"dx": s * mgB @ np.abs(A), "dA": s * mgB.T @ np.abs(x), "dBt": s * mu.T @ np.abs(g)})


# (M, K, N, r): rows at and across the backward's 64-row chunks with a four-row tail, lane tails in K and N,
# wide rows (several 16-row chunks, dots4's tiles)
DORA_SUM_SHAPES = [(1, 5, 3, 1), (7, 16, 37, 3), (67, 20, 33, 5), (131, 48, 64, 8), (21, 1100, 2000, 17)]


@pytest.mark.parametrize("M,K,N,r", DORA_SUM_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in DORA_SUM_SHAPES])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shifted", [False, True], ids=["sum(g z)", "sums of g (y - b)"])
def test_dora_backward_sums_of_g_and_z(library, M, K, N, r, threads, shifted):
    """dora_backward_f32 with z and no shift: gz = sum_rows(g z) (accumulate_products, four rows per pass and
    a row tail); with a shift b: sum_rows(g (y - b)), sum_rows(|g| (|y| + |b|)), sum_rows(|g (y - b)|)
    (accumulate_shifted_products). dx, dA and dB^T of the same call (u given; u NULL: formed from x per chunk)
    checked too, on one thread and two (the partial sums reduced)."""
    gen = np.random.default_rng(M * 7 + N)
    g, x, A, Bt, z, shift = (_rand(gen, *shape) for shape in ((M, N), (M, K), (r, K), (r, N), (M, N), (N,)))
    s = 1.75
    u = (x.astype(np.float64) @ A.astype(np.float64).T).astype(np.float32) if not shifted else None
    dx, dA, dBt = np.empty((M, K), np.float32), np.empty((r, K), np.float32), np.empty((r, N), np.float32)
    gz = np.empty((3, N) if shifted else (N,), np.float32)
    partial = np.empty(library.dora_backward_scratch(K, N, r, threads), np.float32)
    library.dora_backward_f32(_p(g), _p(x), _p(u), _p(A), _p(Bt), s, M, K, N, r, _p(dx), _p(dA), _p(dBt), _p(z),
                              _p(shift if shifted else None), _p(gz), _p(partial), threads)
    ref, mag = _backward_reference(g, x, A, Bt, s)
    longest = max(M, K, N)
    for name, got in (("dx", dx), ("dA", dA), ("dBt", dBt)):
        _assert_close(name, got, ref[name], mag[name], longest)
    g64, z64, b64 = g.astype(np.float64), z.astype(np.float64), shift.astype(np.float64)
    if shifted:
        d = z64 - b64
        sums = [(g64 * d).sum(0), (np.abs(g64) * (np.abs(z64) + np.abs(b64))).sum(0), np.abs(g64 * d).sum(0)]
        mags = [(np.abs(g64) * (np.abs(z64) + np.abs(b64))).sum(0)] * 3
        for row, (want, size) in enumerate(zip(sums, mags)):
            _assert_close(f"sums[{row}]", gz[row], want, size, M + 2)
    else:
        _assert_close("gz", gz, (g64 * z64).sum(0), np.abs(g64 * z64).sum(0), M)


def test_transpose_many_leaves_no_room_for_absent_slots(library):
    """lora_transpose_many_f32: B_a^T one after another, a slot whose B is NULL taking no room even with a rank
    given (lorakern/mixed_c.py passes 0 there, so only a direct call sees where the next slot starts)."""
    gen = np.random.default_rng(3)
    N, ranks = 37, [3, 5, 2]
    B = [_rand(gen, N, 3), None, _rand(gen, N, 2)]
    dst = np.full(sum(ranks) * N + 1, np.nan, np.float32)  # room for every rank, so a wrong layout fails cleanly
    addresses = (ctypes.c_void_p * 3)(*[None if b is None else b.ctypes.data for b in B])
    library.lora_transpose_many_f32(addresses, (ctypes.c_int64 * 3)(*ranks), 3, N, _p(dst))
    want = np.concatenate([B[0].T.ravel(), B[2].T.ravel()])
    assert np.array_equal(dst[:want.size], want)
    assert np.isnan(dst[want.size:]).all(), "an absent slot took room"
