"""pytest-benchmark setup for benchmarks/: the same import hygiene as tests/conftest.py.

The repository root holds a folder named kernels/ (installed as lorakern.kernels); bitsandbytes and
transformers import any top-level ``kernels``, so the root is kept off sys.path. Without CUDA the Triton
kernels would run interpreted, so TRITON_INTERPRET is set before triton's first import. The allocator is
left as a user's process has it; LORAKERN_BENCH_MALLOC=keep keeps freed memory for reuse as in
``lorakern bench --malloc keep`` (see lorakern.bench), a tuned extra.
"""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

if os.environ.get("LORAKERN_BENCH_MALLOC", "default") == "keep":
    from lorakern import bench

    bench.keep_freed_memory()
