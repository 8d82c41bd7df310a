"""Hypothesis strategies that reach every tile class of every LoRA path, and the share each class gets.

The tile classes follow the Triton kernels' launch parameters (kernels/configs.py; under the interpreter
one config: BLOCK_M = BLOCK_N = BLOCK_K = 32, and the split-K decoding kernel for M <= SMALL_M = 16;
test_kernels_interpreted.py checks these constants against the configs). The same classes serve the torch
and C paths, whose own edges (four-row and vector-lane tails of the C kernels) they cover too.

Each axis is drawn uniformly from its labels (``axes_for``), so a label's stated share is 1 / (number of
labels). ``assert_shares`` checks, on the examples a property test actually ran, that every label got at
least SHARE_FLOOR of its stated share. Hypothesis does not draw exactly uniformly (its generator replays and
mutates earlier choices): over the CI profile's 60 derandomized examples a label of six gets between 2 and
14 of them where 10 is its share (measured), and which examples it draws after the first few depends on
how the earlier ones ran (a full-suite run drew the power-of-two rank 2 times in 60 where a lone run of
the same test drew it more), so the floor is a tenth of the share (2 of 60 for an axis of three labels,
1 for one of six). A strategy change that starves a label still fails here, and the thorough profile's
1000 draws sit close to the stated shares.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from hypothesis import strategies as st

SMALL_M = 16
BLOCK = 32
# label -> the values drawn for it
M_CLASSES = {
    "1-D (M=1)": (1, 1),
    "M<16 (split-K, below the small-M limit)": (2, SMALL_M - 1),
    "M=16 (at the small-M limit)": (SMALL_M, SMALL_M),
    "16<M<32 (tiled, one partial M tile)": (SMALL_M + 1, BLOCK - 1),
    "M=32 or 64 (whole M tiles)": (BLOCK, 2 * BLOCK),
    "32<M<=50 (tiled, ragged, two M tiles)": (BLOCK + 1, 50),
}
LAYOUTS = ("contiguous 2-D", "3-D", "non-contiguous")
WIDTHS = ("ragged (not a multiple of 32)", "whole blocks (32, 64)")
RANKS = ("r=1", "r not a power of two", "r a power of two (2..64)")
DROPOUTS = (0.0, 0.1, 0.5)
# The C kernels' wide-row classes (lorakern/native/lora_cpu.c), drawn only where a test asks (``wide_share``):
# rows longer than DOT_TILE = 1024 floats are dotted in tiles, r > DOT_GROUP = 16 rows of A / B^T take a second
# group of carried sums, and the backward's chunks shrink below 64 rows once K + N > 2048 (512 KB / ((K + N)
# x 16 bytes) four-row blocks). K, N in 1025..2200 (their tails off the vector width mostly, sometimes whole)
# give chunks of 28..60 rows; M in 61..80 spans two or three of them; r in 17..40.
WIDE = "wide rows (K, N > 1024, r > 16, several backward chunks)"
NARROW = "small shapes"
WIDE_MAX = 2200


@dataclass
class Case:
    """One drawn layer and input. ``classes``: axis -> label, for the share count."""

    lead: tuple
    K: int
    N: int
    r: int
    dtype: torch.dtype
    layout: str
    dropout: float
    bias: bool
    seed: int
    alpha: Optional[float] = None
    use_rslora: bool = False
    extra: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)

    @property
    def M(self) -> int:
        out = 1
        for size in self.lead:
            out *= size
        return out


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@st.composite
def _width(draw, cap: int):
    label = draw(st.sampled_from(WIDTHS))
    if label == WIDTHS[1]:
        return label, draw(st.sampled_from([w for w in (32, 64) if w <= cap]))
    return label, draw(st.integers(1, cap).filter(lambda w: w % BLOCK != 0))


def _rank(draw, max_r: int) -> tuple[str, int]:
    label = draw(st.sampled_from(RANKS))
    if label == RANKS[0]:
        return label, 1
    powers = [p for p in (2, 4, 8, 16, 32, 64) if p <= max_r]
    if label == RANKS[2]:
        return label, draw(st.sampled_from(powers))
    return label, draw(st.integers(3, max_r).filter(lambda r: r & (r - 1) != 0))


@st.composite
def lora_cases(draw, dtypes, max_r: int = 64, width_cap: int = 70, scaling: bool = False, wide_share: int = 0,
               **extra):
    """A Case: M from M_CLASSES, layout from LAYOUTS, K and N from WIDTHS, r from RANKS, dtype from
    ``dtypes``, dropout from DROPOUTS, bias on or off; ``scaling`` also draws alpha and rsLoRA; ``extra``
    name -> strategy for a path's own parameters (labels of their values are counted too). ``wide_share`` = n
    (C kernels only: the float64 reference of a wide case costs ~1000 small ones): 1 case in n is a WIDE
    one instead (axis "wide", stated shares ``wide_shares(n)``), its M / K / N / r labelled WIDE too."""
    if wide_share and draw(st.integers(1, wide_share)) == wide_share:
        return _wide_case(draw, dtypes, scaling, extra)
    m_label = draw(st.sampled_from(list(M_CLASSES)))
    low, high = M_CLASSES[m_label]
    M = draw(st.sampled_from([BLOCK, 2 * BLOCK])) if m_label.startswith("M=32") else draw(st.integers(low, high))
    layout = "1-D" if m_label.startswith("1-D") else draw(st.sampled_from(LAYOUTS))
    if layout == "1-D":
        lead = ()
    elif layout == "3-D":
        split = next((d for d in (2, 3, 5, 7) if M % d == 0), 1)
        lead = (split, M // split)
    else:
        lead = (M,)
    k_label, K = draw(_width(width_cap))
    n_label, N = draw(_width(width_cap))
    r_label, r = _rank(draw, max_r)
    dtype = draw(st.sampled_from(list(dtypes)))
    dropout = draw(st.sampled_from(DROPOUTS))
    case = Case(lead, K, N, r, dtype, layout, dropout, draw(st.booleans()), draw(st.integers(0, 2**16)))
    if scaling:
        case.alpha = draw(st.one_of(st.none(), st.floats(0.5, 64.0)))
        case.use_rslora = draw(st.booleans())
    case.extra = {name: draw(strategy) for name, strategy in extra.items()}
    case.classes = {"M": m_label, "layout": layout, "K": k_label, "N": n_label, "r": r_label,
                    "dtype": dtype_label(dtype), "dropout": f"p={dropout}",
                    **{name: f"{name}={value}" for name, value in case.extra.items()}}
    if wide_share:
        case.classes["wide"] = NARROW
    return case


def _wide_case(draw, dtypes, scaling: bool, extra: dict) -> Case:
    M = draw(st.integers(61, 80))
    layout = draw(st.sampled_from(LAYOUTS))
    lead = (M // 2, 2) if layout == "3-D" and M % 2 == 0 else (M,)
    layout = "contiguous 2-D" if layout == "3-D" and M % 2 else layout
    K, N = (draw(st.one_of(st.integers(1025, WIDE_MAX), st.sampled_from([1040, 2048]))) for _ in range(2))
    case = Case(lead, K, N, draw(st.integers(17, 40)), draw(st.sampled_from(list(dtypes))), layout,
                draw(st.sampled_from(DROPOUTS)), draw(st.booleans()), draw(st.integers(0, 2**16)))
    if scaling:
        case.alpha = draw(st.one_of(st.none(), st.floats(0.5, 64.0)))
        case.use_rslora = draw(st.booleans())
    case.extra = {name: draw(strategy) for name, strategy in extra.items()}
    case.classes = {"M": WIDE, "layout": layout, "K": WIDE, "N": WIDE, "r": WIDE, "dtype": dtype_label(case.dtype),
                    "dropout": f"p={case.dropout}", "wide": WIDE,
                    **{name: f"{name}={value}" for name, value in case.extra.items()}}
    return case


def wide_shares(n: int) -> dict:
    """The stated shares of the "wide" axis for ``lora_cases(wide_share=n)``, for ``assert_shares``."""
    return {NARROW: 1 - 1 / n, WIDE: 1 / n}


def make_input(case: Case, device: str = "cpu") -> torch.Tensor:
    """x for ``case`` in its layout: non-contiguous inputs alternate between a transposed and a strided view."""
    gen = torch.Generator().manual_seed(case.seed)
    if case.layout != "non-contiguous":
        x = torch.randn(*case.lead, case.K, generator=gen, dtype=torch.float64)
    elif case.seed % 2:
        x = torch.randn(case.K, case.M, generator=gen, dtype=torch.float64).t()
    else:
        x = torch.randn(2 * case.M, 2 * case.K, generator=gen, dtype=torch.float64)[::2, ::2]
    return x.to(device=device, dtype=case.dtype)


# Explicit cases, one per tile class (and each layout, ragged and whole widths, r = 1, non-powers of two and
# 64, with and without dropout), the dtype given by the test: (lead, K, N, r, layout, dropout).
EXPLICIT = [
    ((), 33, 17, 3, "1-D", 0.1),
    ((5,), 40, 96, 6, "contiguous 2-D", 0.0),
    ((SMALL_M,), 64, 33, 5, "non-contiguous", 0.5),
    ((SMALL_M + 1,), 31, 65, 16, "contiguous 2-D", 0.1),
    ((BLOCK,), 96, 32, 12, "contiguous 2-D", 0.0),
    ((2, 35), 45, 70, 64, "3-D", 0.1),
    ((67,), 7, 1, 1, "non-contiguous", 0.0),
]


def explicit_case(index: int, dtype: torch.dtype, **extra) -> Case:
    lead, K, N, r, layout, dropout = EXPLICIT[index]
    return Case(lead, K, N, r, dtype, layout, dropout, bias=index % 2 == 0, seed=index, extra=extra)


def explicit_id(index: int) -> str:
    lead, K, N, r, layout, dropout = EXPLICIT[index]
    return f"x{'x'.join(map(str, lead)) or '1-D'}-K{K}-N{N}-r{r}-{layout.split()[0]}-p{dropout}"


SHARE_FLOOR = 1 / 10


def assert_shares(cases: list, axes: dict) -> dict:
    """Every label of every axis got at least SHARE_FLOOR of its stated share (1 / labels) of ``cases``;
    returns axis -> {label: measured share}. ``axes``: axis -> labels (``axes_for``), or label -> its
    stated share where an axis is not drawn uniformly."""
    assert cases, "the property test ran no examples"
    shares = {}
    for axis, labels in axes.items():
        counts = Counter(case.classes[axis] for case in cases)
        shares[axis] = {label: counts[label] / len(cases) for label in labels}
        stated = labels if isinstance(labels, dict) else {label: 1 / len(labels) for label in labels}
        thin = {label: counts[label] for label in labels
                if counts[label] < SHARE_FLOOR * stated[label] * len(cases) - 1e-9}
        assert not thin, (f"{axis}: labels drawn in fewer than {SHARE_FLOOR:.0%} of their stated shares "
                          f"{ {label: f'{stated[label]:.1%}' for label in thin} } of {len(cases)} examples: {thin} "
                          f"(all: {dict(counts)})")
    # the measured shares, for `pytest -rP` (docs/testing.md quotes them)
    print(f"{len(cases)} examples: " + "; ".join(
        f"{axis}: " + ", ".join(f"{label.split(' (')[0]} {share:.0%}" for label, share in by_label.items())
        for axis, by_label in shares.items()))
    return shares


def axes_for(dtypes, max_r: int = 64, **extra_labels) -> dict:
    """The labels ``lora_cases`` draws on each axis, for ``assert_shares``."""
    return {"M": list(M_CLASSES), "layout": list(LAYOUTS), "K": list(WIDTHS), "N": list(WIDTHS), "r": list(RANKS),
            "dtype": [dtype_label(d) for d in dtypes], "dropout": [f"p={p}" for p in DROPOUTS], **extra_labels}


# The mixed-adapter Triton kernels' property test (test_kernels_mixed.py): its axes, each drawn uniformly
# from its labels (the stated share: 1 / its labels) and checked on the examples that ran: M's tile classes
# and K / N's widths as above (widths capped at 48: interpreted segmented kernels cost more per example),
# then the mixed axes.
MIXED_ROWS = ("spread over slots and base rows", "every row one slot", "a slot without rows", "every row base-only")
MIXED_RANKS = ("r=1 among the slots", "r=64 among the slots", "ranks 2..63 only")


def draw_ranks(draw, rows_label: str, ranks_label: str) -> list:
    """1..4 adapters' ranks (2 at least for the MIXED_ROWS class that leaves one without rows): one of them 1 or
    64 as ``ranks_label`` of MIXED_RANKS says, the others 2..63."""
    n = draw(st.integers(2 if rows_label == MIXED_ROWS[2] else 1, 4))
    ranks = [draw(st.integers(2, 63)) for _ in range(n)]
    if ranks_label != MIXED_RANKS[2]:
        ranks[draw(st.integers(0, n - 1))] = 1 if ranks_label == MIXED_RANKS[0] else 64
    return ranks


def draw_slots(draw, M: int, n: int, rows_label: str) -> list:
    """M rows' slots among n adapters (-1: base only) of the MIXED_ROWS class ``rows_label``."""
    if rows_label == MIXED_ROWS[0]:
        return draw(st.lists(st.integers(-1, n - 1), min_size=M, max_size=M))
    if rows_label == MIXED_ROWS[1]:
        return [draw(st.integers(0, n - 1))] * M
    if rows_label == MIXED_ROWS[2]:
        empty = draw(st.integers(0, n - 1))
        return draw(st.lists(st.sampled_from([-1] + [a for a in range(n) if a != empty]), min_size=M, max_size=M))
    return [-1] * M


# The C passes' K and N (test_mixed_c.py, test_mixed_dora_c.py): whole vectors at every ISA level (a multiple of 16
# floats) or a lane tail, each drawn uniformly.
LANE_WIDTHS = ("whole vectors (a multiple of 16)", "a lane tail")


def draw_lane_widths(draw, whole: list, tail_max: int) -> list:
    """K and N as two (LANE_WIDTHS label, width): whole from ``whole``, a tail from 1..tail_max off the multiples of 16."""
    widths = []
    for _ in range(2):
        label = draw(st.sampled_from(LANE_WIDTHS))
        widths.append((label, draw(st.sampled_from(whole)) if label == LANE_WIDTHS[0]
                       else draw(st.integers(1, tail_max).filter(lambda w: w % 16 != 0))))
    return widths


ABSENT = ("the layer has every slot's adapter", "the layer lacks one slot's adapter")
MIXED_DTYPES = ("fp32", "bf16", "fp16")
BASE_KINDS = ("dense", "nf4")
MIXED_AXES = {"M": list(M_CLASSES), "K": list(WIDTHS), "N": list(WIDTHS),
              "rows": list(MIXED_ROWS), "ranks": list(MIXED_RANKS), "absent": list(ABSENT),
              "dtype": list(MIXED_DTYPES), "base": list(BASE_KINDS)}
WIDTH_CAP = 48


@st.composite
def mixed_kernel_cases(draw):
    m_label = draw(st.sampled_from(list(M_CLASSES)))
    low, high = M_CLASSES[m_label]
    M = draw(st.sampled_from([low, high]) if m_label.startswith("M=32") else st.integers(low, high))
    widths = []
    for _ in range(2):
        label = draw(st.sampled_from(WIDTHS))
        value = (draw(st.sampled_from([32])) if label == WIDTHS[1]
                 else draw(st.integers(1, WIDTH_CAP).filter(lambda w: w % BLOCK != 0)))
        widths.append((label, value))
    rows_label, ranks_label = draw(st.sampled_from(MIXED_ROWS)), draw(st.sampled_from(MIXED_RANKS))
    absent_label = draw(st.sampled_from(ABSENT))
    ranks = draw_ranks(draw, rows_label, ranks_label)
    if absent_label == ABSENT[1]:
        ranks[draw(st.integers(0, len(ranks) - 1))] = None
    slots = draw_slots(draw, M, len(ranks), rows_label)
    dtype, base = draw(st.sampled_from(MIXED_DTYPES)), draw(st.sampled_from(BASE_KINDS))
    classes = {"M": m_label, "K": widths[0][0], "N": widths[1][0], "rows": rows_label, "ranks": ranks_label,
               "absent": absent_label, "dtype": dtype, "base": base}
    return dict(M=M, K=widths[0][1], N=widths[1][1], ranks=ranks, slots=slots, dtype=dtype, base=base,
                seed=draw(st.integers(0, 2**16)), classes=classes)
