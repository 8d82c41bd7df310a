"""Every launch config a GPU autotunes over, run under the interpreter against the float64 reference.

The other interpreted tests run one config per kernel (32-wide blocks, two tiles per program, GROUP_M 2). A GPU
autotunes over the tables of kernels/configs.py instead: blocks of 16 to 128, one to four tiles per program,
GROUP_M 8. The compile checks (tests/test_kernels_compiled.py) build those for sm_80 and sm_90 but never run
them, so an index or mask that only a 128-row tile or a four-tile program reaches would first show on a GPU.
Here every tile shape of the tables runs on CPU, with compiled_configs forced into the interpreted launches
(entries that differ only in warps and stages, which do nothing under the interpreter, run once):
- each kernel family: plain, DoRA, DoRA with dropout, the segmented kernels of mixed batches, with DoRA slots,
  with DoRA slots and dropout;
- dense and NF4 bases, the fp32 and the 16-bit tables (bf16 here; fp16 shares its table);
- each padded rank R_PAD (16, 32, 64) at an r that is not a power of two;
- a family's forward and backward configs paired by index;
- the decoding kernel's (M <= SMALL_M) split-K configs.
Each shape follows its configs: two M tiles (the second ragged; one partial GROUP_M group); in the forward two
column groups (the second one ragged tile) and a K loop of two steps (the second ragged); in the backward two
K-tile groups (likewise) and an N loop of two steps. On a CUDA machine the same cases run compiled, each config
an autotuner of its own (a compile per config: minutes on an H200; not part of the device check's budget).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl
from torch import nn

from lorakern import LoraLinear
from lorakern.kernels import configs, forward, launchers
from lorakern.kernels.configs import RANK_PADS, SMALL_M, compiled_configs, compiled_small_m_configs
from lorakern.testing import assert_matches_reference, compare_layer, random_layer
from lorakern.testing_dora import compare_dora

import test_kernels_mixed as mixed
import test_kernels_mixed_dora as mixed_dora
from test_kernels_dora import triton_dora_layer

DEVICE = mixed.DEVICE

# family -> (forward kind, backward kind) as the launchers name them
FAMILIES = {
    "plain": ("fwd", "bwd"),
    "dora": ("dora_fwd", "dora_bwd"),
    "dora-dropout": ("dora_drop_fwd", "dora_drop_bwd"),
    "mixed": ("mixed_fwd", "mixed_bwd"),
    "mixed-dora": ("mixed_dora_fwd", "mixed_dora_bwd"),
    "mixed-dora-dropout": ("mixed_dora_drop_fwd", "mixed_dora_drop_bwd"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK = {16: 13, 32: 19, 64: 37}  # an r that is not a power of two, per padded rank


def geometry(config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, tiles per program) of a tiled kernel's config."""
    k = config.kwargs
    return k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k.get("TILES_N", k.get("TILES_K"))


@dataclass(frozen=True)
class Case:
    family: str
    weight: str
    dtype: str
    r_pad: int
    forward: object  # triton.Config
    backward: object

    @property
    def id(self) -> str:
        f, b = ("x".join(map(str, geometry(c))) for c in (self.forward, self.backward))
        return f"{self.family}-{self.weight}-{self.dtype}-R{self.r_pad}-fwd{f}-bwd{b}"

    def shape(self) -> tuple[int, int, int]:
        bm, bn, bk, tiles_n = geometry(self.forward)
        bm2, bn2, bk2, tiles_k = geometry(self.backward)
        M = max(bm, bm2) + 7
        N = max(bn * tiles_n + bn // 2, bn2 + bn2 // 2) + 3
        K = max(bk + bk // 2, bk2 * tiles_k + bk2 // 2) + 5
        return M, K, N


def table_cases() -> list[Case]:
    """Per family, base and table, R_PAD by R_PAD: the forward configs whose tile shape has not run yet paired with
    the backward configs whose shape has not (the shorter list padded with the R_PAD's first config), or the first
    pair when neither list brings a new shape, so that each R_PAD runs too. Entries that differ only in warps and
    stages do nothing different under the interpreter. An empty list is skipped: the dispatch declines Triton there
    (tests/test_kernels_dora.py and test_kernels_mixed_dora.py test that refusal)."""
    cases = []
    for family, (fwd, bwd) in FAMILIES.items():
        for weight in ("dense", "nf4"):
            for label, dtype in DTYPES.items():
                ran_fwd, ran_bwd = set(), set()
                for r_pad in RANK_PADS:
                    forward = compiled_configs(fwd, dtype, r_pad, weight)
                    backward = compiled_configs(bwd, dtype, r_pad, weight)
                    if not forward or not backward:
                        continue
                    new_fwd = _new_shapes(forward, ran_fwd) or forward[:1]
                    new_bwd = _new_shapes(backward, ran_bwd) or backward[:1]
                    for i in range(max(len(new_fwd), len(new_bwd))):
                        f = new_fwd[i] if i < len(new_fwd) else forward[0]
                        b = new_bwd[i] if i < len(new_bwd) else backward[0]
                        cases.append(Case(family, weight, label, r_pad, f, b))
    return cases


def _new_shapes(table: list, ran: set) -> list:
    """The configs of ``table`` whose tile shape is not in ``ran`` (one per shape), adding their shapes to it."""
    out = []
    for config in table:
        if geometry(config) not in ran:
            ran.add(geometry(config))
            out.append(config)
    return out


CASES = table_cases()


def test_the_cases_reach_every_table_entry():
    """Each tile shape that a (kind, base, table) can autotune over is some case's forward or backward config, each
    R_PAD with configs runs for each family, base and table, and the cases reach what the interpreted default
    config does not: 128-row tiles, four tiles per program, GROUP_M 8."""
    wanted, reached = set(), set()
    for family, kinds in FAMILIES.items():
        for weight in ("dense", "nf4"):
            for label, dtype in DTYPES.items():
                for r_pad in RANK_PADS:
                    found = [compiled_configs(kind, dtype, r_pad, weight) for kind in kinds]
                    if all(found):
                        wanted.add((family, weight, label, r_pad))
                    wanted |= {(kind, weight, label, geometry(c)) for kind, configs_ in zip(kinds, found)
                               for c in configs_ if all(found)}
    for case in CASES:
        fwd, bwd = FAMILIES[case.family]
        reached |= {(case.family, case.weight, case.dtype, case.r_pad),
                    (fwd, case.weight, case.dtype, geometry(case.forward)),
                    (bwd, case.weight, case.dtype, geometry(case.backward))}
    assert wanted == reached
    shapes = {geometry(c) for case in CASES for c in (case.forward, case.backward)}
    assert {128, 16} <= {g[0] for g in shapes} and {1, 2, 4} <= {g[3] for g in shapes}
    assert {case.forward.kwargs["GROUP_M"] for case in CASES} == {8}


@pytest.fixture(autouse=True)
def fresh_autotuners():
    """Compiled, the launchers keep one autotuner per (kind, dtype, R_PAD, weight): each case builds its own from
    the one config it forces, and the suite's autotuners come back afterwards."""
    saved = dict(configs._AUTOTUNED)
    configs._AUTOTUNED.clear()
    yield
    configs._AUTOTUNED.clear()
    configs._AUTOTUNED.update(saved)


def forcing(monkeypatch, case: Case) -> list:
    """Force the case's configs into the launches; returns the list of kinds launched."""
    launched = []

    def only(kind, dtype, r_pad, weight="dense"):
        launched.append(kind)
        return [case.forward if kind.endswith("fwd") else case.backward]
    monkeypatch.setattr(configs, "get_autotune_config", only)
    return launched


def nf4_layer(K: int, N: int, r: int, dtype: torch.dtype, dropout: float, seed: int) -> LoraLinear:
    """A plain LoRA layer on an NF4 base quantized from a random nn.Linear, A and B random, on the triton backend."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=gen) / math.sqrt(K))
        linear.bias.copy_(torch.randn(N, generator=gen) / math.sqrt(K))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear.from_linear(linear, quantize="nf4", compute_dtype=dtype, lora_dtype=dtype, r=r,
                                       dropout=dropout)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / math.sqrt(K))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) / math.sqrt(r))
    layer.bias.requires_grad_(True)
    layer.backend = "triton"
    return layer.to(DEVICE).train()


def run_case(case: Case) -> None:
    M, K, N = case.shape()
    dtype, r, seed = DTYPES[case.dtype], RANK[case.r_pad], M + K + N
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE, dtype)
    if case.family == "plain":
        layer = (random_layer(K, N, r, dtype, dropout=0.1, seed=seed, device=DEVICE) if case.weight == "dense"
                 else nf4_layer(K, N, r, dtype, dropout=0.1, seed=seed))
        layer.backend = "triton"
        assert_matches_reference(compare_layer(layer.train(), x, seed=seed))
    elif case.family.startswith("dora"):
        layer = triton_dora_layer(K, N, r, dtype, base=case.weight, dropout=0.2 if "dropout" in case.family else 0.0,
                                  seed=seed)
        assert_matches_reference(compare_dora(layer, x, seed))
    else:  # a slot of rank r, a rank-3 slot, an absent adapter, a rank-6 slot; base-only rows among them
        ranks = [r, 3, None, 6]
        slots = mixed.slots_for("random", M, len(ranks), seed)
        dropouts = [0.2, 0.0, 0.0, 0.1] if case.family in ("mixed", "mixed-dora-dropout") else None
        if case.family == "mixed":
            call, W = mixed.build(M, K, N, ranks, slots, dtype, base=case.weight, dropouts=dropouts, seed=seed)
            mixed.assert_matches(call, W)
        else:
            call, W = mixed_dora.build_dora(M, K, N, ranks, {0, 3}, slots, dtype, base=case.weight,
                                            dropouts=dropouts, seed=seed)
            mixed_dora.assert_matches(call, W, ranks)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_table_config_matches_reference(case, monkeypatch):
    launched = forcing(monkeypatch, case)
    run_case(case)
    assert set(launched) == set(FAMILIES[case.family]), launched


@triton.jit
def _tile_ids_ignoring_a_partial_group(pid, num_pid_m, num_pid_inner, GROUP_M: tl.constexpr):
    """kernels/tiles.py's _tile_ids without min(num_pid_m - first_pid_m, GROUP_M): right while the m tiles fill
    whole groups (as they can under the interpreted GROUP_M 2), wrong for a last group cut short."""
    num_pid_in_group = GROUP_M * num_pid_inner
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    return first_pid_m + ((pid % num_pid_in_group) % GROUP_M), (pid % num_pid_in_group) // GROUP_M


@pytest.mark.skipif(not configs.INTERPRETED, reason="swaps a jit helper in its module: interpreted kernels only")
def test_a_tile_order_wrong_for_a_partial_group_fails(monkeypatch):
    """The comparison sees a wrong program-to-tile map of the forward under a GROUP_M 8 table config, and the same
    map passes at the interpreted default config on a shape whose m tiles fill its groups."""
    case = next(c for c in CASES if (c.family, c.weight, c.dtype) == ("plain", "dense", "fp32"))
    monkeypatch.setattr(forward, "_tile_ids", _tile_ids_ignoring_a_partial_group)
    layer = random_layer(45, 70, 5, torch.float32, seed=1)
    layer.backend = "triton"
    x = torch.randn(64, 45, generator=torch.Generator().manual_seed(1))
    assert_matches_reference(compare_layer(layer.train(), x))  # 2 m tiles of 32: one whole GROUP_M 2 group
    forcing(monkeypatch, case)
    with pytest.raises(AssertionError):
        run_case(case)


# The decoding kernel: (base, table, kind) -> its configs; kind small (plain), dora_small, dora_drop_small.
SMALL_CASES = [(weight, label, kind, config)
               for weight in ("dense", "nf4") for label, dtype in DTYPES.items()
               for kind in ("small", "dora_small", "dora_drop_small")
               for config in compiled_small_m_configs(dtype, weight, kind)]


def small_id(case) -> str:
    weight, label, kind, config = case
    k = config.kwargs
    return f"{kind}-{weight}-{label}-{k['BLOCK_N']}x{k['BLOCK_K']}-split{k['SPLIT_K']}"


@pytest.mark.parametrize("case", SMALL_CASES, ids=[small_id(c) for c in SMALL_CASES])
def test_decoding_config_matches_reference(case, monkeypatch):
    """M = 7: two column tiles (the second ragged), SPLIT_K parts of one K step each, the last part short (the
    interpreted default config runs parts of several steps)."""
    weight, label, kind, config = case
    k = config.kwargs
    M, N = 7, 2 * k["BLOCK_N"] - 3
    K = k["SPLIT_K"] * k["BLOCK_K"] - k["BLOCK_K"] // 2 - 3
    dtype, r, seed = DTYPES[label], 5, N + K
    assert M <= SMALL_M
    launched = []
    monkeypatch.setattr(launchers, "_small_m_configs", lambda *args: launched.append(args) or [config])
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE, dtype)
    if kind == "small":
        layer = (random_layer(K, N, r, dtype, dropout=0.1, seed=seed, device=DEVICE) if weight == "dense"
                 else nf4_layer(K, N, r, dtype, dropout=0.1, seed=seed))
        layer.backend = "triton"
        assert_matches_reference(compare_layer(layer.train(), x, seed=seed))
    else:
        layer = triton_dora_layer(K, N, r, dtype, base=weight, dropout=0.2 if "drop" in kind else 0.0, seed=seed)
        assert_matches_reference(compare_dora(layer, x, seed))
    assert launched, "the decoding kernel did not run"


def test_autotune_switch_keeps_the_first_config_only(monkeypatch):
    """LORAKERN_AUTOTUNE=0 (compiled test runs on a GPU, benchmarks/device_check.sh): each kernel's autotuner gets
    the first config of its table only; unset or 1, every config; another value is refused naming the choices."""
    monkeypatch.setattr(configs, "INTERPRETED", False)
    full = compiled_configs("mixed_dora_drop_bwd", torch.bfloat16, 32, "nf4")
    small = compiled_small_m_configs(torch.bfloat16, "nf4")
    assert len(full) > 1 and len(small) > 1
    described = lambda table: [(c.kwargs, c.num_warps, c.num_stages) for c in table]  # noqa: E731
    monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    assert described(configs.get_autotune_config("mixed_dora_drop_bwd", torch.bfloat16, 32, "nf4")) == described(full)
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    assert described(configs.get_autotune_config("mixed_dora_drop_bwd", torch.bfloat16, 32, "nf4")) \
        == described(full[:1])
    assert described(configs._small_m_configs(torch.bfloat16, "nf4")) == described(small[:1])
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "off")
    with pytest.raises(ValueError, match="LORAKERN_AUTOTUNE='off'.*set it to 1"):
        configs.get_autotune_config("fwd", torch.float32, 16)
