"""The ``lorakern`` command."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def add_bench_command(sub) -> None:
    """``lorakern bench``: the side-by-side benchmark of lorakern.bench (see its module docstring)."""
    bench = sub.add_parser("bench", help="time and peak memory of a LoRA layer vs its frozen base and its peers")
    bench.add_argument("--quick", action="store_true",
                       help="one tiny shape, 2 rounds, every provider and NF4: proves the pipeline in seconds")
    bench.add_argument("--out", default=None, help="folder for lora_linear.{json,md,png} (default: print only)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    bench.add_argument("--plot", action="store_true", help="also write lora_linear.png (needs --out)")
    bench.add_argument("--nf4", action="store_true", help="also time NF4 against bitsandbytes (when installed)")
    bench.add_argument("--shapes", default=None, help="comma-separated layers, KxN: 768x768,768x3072,4096x4096 (default: all)")
    bench.add_argument("--ranks", default=None, help="comma-separated ranks (default: 8,16,64)")
    bench.add_argument("--tokens", type=int, default=None, help="tokens M per shape (default: sized for the device)")
    bench.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    bench.add_argument("--modes", default=None, help="comma-separated: fwd,bwd,fwd+bwd (default: all three)")
    bench.add_argument("--provider", action="append", default=None,
                       help="a provider to time beside the frozen layer, e.g. 'lorakern torch'; repeat for more "
                            "(default: every one installed)")
    bench.add_argument("--adapters", type=int, default=None,
                       help="time a mixed-adapter batch instead: rows spread evenly over N adapters (lorakern mixed, "
                            "a loop of the single-adapter layer, PEFT's adapter_names=); default shape 768x768 r=8")
    bench.add_argument("--use-dora", action="store_true",
                       help="with --adapters N: every adapter DoRA (lorakern mixed beside the same layer pinned to "
                            "its torch path; no PEFT row: PEFT refuses DoRA in mixed batches)")
    bench.add_argument("--malloc", default="default", choices=("keep", "default"),
                       help="default: the C library's own behaviour, as a user's training process runs (default); "
                            "keep: glibc keeps freed memory for reuse, so no provider pays page faults for "
                            "recycled buffers (a tuned extra: changes this process's allocator, and says so)")


def run_bench(args) -> int:
    """Turn ``lorakern bench`` flags into a lorakern.bench.run call; bad values raise ValueError with the fix."""
    import torch

    from lorakern import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype_name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {dtype_name!r}")
    if args.plot and not args.out:
        raise ValueError("--plot writes lora_linear.png into --out; pass --out DIR as well")
    if args.tokens is not None and args.tokens <= 0:
        raise ValueError(f"--tokens must be a positive integer, got {args.tokens}")
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else bench.MODES
    if args.quick:
        shapes, rounds, nf4 = bench.SHAPES_QUICK, 2, (128, 128, 16)
    else:
        layers = tuple(s.strip() for s in args.shapes.split(",")) if args.shapes else tuple(bench.LAYERS)
        try:
            ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else bench.RANKS
        except ValueError:
            raise ValueError(f"--ranks must be comma-separated integers, got {args.ranks!r}; e.g. --ranks 8,16,64") from None
        shapes, rounds = bench.shape_grid(layers, ranks, device, args.tokens), args.rounds
        nf4 = (4096, 4096, 256) if args.nf4 else None
    if args.use_dora and args.adapters is None:
        raise ValueError("--use-dora applies to a mixed batch: pass --adapters N as well (one DoRA adapter: "
                         "--provider 'lorakern DoRA')")
    if args.adapters is not None:
        from lorakern.bench.mixed import run_mixed

        if not (args.quick or args.shapes or args.ranks):
            shapes = bench.shape_grid(("768x768",), (8,), device, args.tokens)
        run_mixed(shapes, args.adapters, getattr(torch, dtype_name), device, rounds, modes, args.out,
                  use_dora=args.use_dora)
        return 0
    bench.run(shapes, getattr(torch, dtype_name), device, args.out, rounds=rounds, draw=args.plot, nf4=nf4,
              modes=modes, only=args.provider, keep_memory=args.malloc == "keep")
    return 0


def _interpret_triton_without_a_gpu() -> None:
    """Without CUDA the Triton kernels run under triton's interpreter, which must be switched on before
    triton is first imported (torch's own modules may import it as a side effect later on)."""
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def main(argv: Optional[list[str]] = None) -> int:
    _interpret_triton_without_a_gpu()
    parser = argparse.ArgumentParser(prog="lorakern", description="LoRA layers with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare every available path against the float64 reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_bench_command(sub)
    from lorakern.harness.cli import add_commands, main_error

    add_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "check":
        from lorakern.check import run_check

        try:
            return 0 if run_check(args.device) else 1
        except ValueError as exc:  # bad settings (LORAKERN_ISA, LORAKERN_FORMULATION, ...): one line naming the fix
            return main_error(exc)
    if args.command == "bench":
        try:
            return run_bench(args)
        except (ValueError, ImportError) as exc:
            return main_error(exc)
    try:
        from lorakern.harness.cli import require_harness_packages

        require_harness_packages()
        code = args.handler(args)
    except (ValueError, ImportError) as exc:  # bad input, or a missing extra: one line naming the fix
        code = main_error(exc)
    from lorakern.harness.distributed import leave

    return leave(code)  # under torchrun: skip the teardown gloo can abort


if __name__ == "__main__":
    sys.exit(main())
