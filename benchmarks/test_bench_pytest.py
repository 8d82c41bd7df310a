"""The providers of lorakern.bench under pytest-benchmark (not collected by the project's ``pytest``,
whose testpaths is tests/):

    pytest benchmarks/ --benchmark-only [--benchmark-group-by=param:shape] [-k lorakern]
    LORAKERN_BENCH_SHAPES=768x768,4096x4096 LORAKERN_BENCH_RANKS=8,16 pytest benchmarks/ --benchmark-only

pytest-benchmark times one test at a time, not interleaved; for ratios measured side by side (what the
README and RESULTS.md report) use ``lorakern bench``. Default shapes: the roberta-base 768x768 layer at
r = 8 on CPU (4096 tokens), every layer at r = 16 on CUDA.
"""
import os

import pytest
import torch

from lorakern import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
_LAYERS = os.environ.get("LORAKERN_BENCH_SHAPES", "768x768" if DEVICE == "cpu" else "768x768,768x3072,4096x4096")
_RANKS = os.environ.get("LORAKERN_BENCH_RANKS", "8" if DEVICE == "cpu" else "16")
SHAPES = bench.shape_grid(tuple(_LAYERS.split(",")), tuple(int(r) for r in _RANKS.split(",")), DEVICE)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", list(bench.providers(DEVICE)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.M}x{s.K}x{s.N}-r{s.r}")
def test_lora_linear(benchmark, shape, provider, mode):
    o = bench.make_operands(shape, DTYPE, DEVICE)
    built = bench.providers(DEVICE)[provider](o)
    step = bench._step(built, o.grad, mode)
    benchmark.group = f"{shape.name} r={shape.r} {mode}"
    benchmark.extra_info.update(M=shape.M, K=shape.K, N=shape.N, r=shape.r, dtype=str(DTYPE))

    def run():
        step.run()
        _sync()

    def setup():
        if step.setup is not None:
            step.setup()

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
