"""Benchmark one LoRA linear layer against its frozen base layer and the unfused formulations.

    python benchmarks/bench_lora_linear.py [--device cuda] [--dtype bfloat16] [--quick] [--out DIR] [--plot] [--malloc keep]

CPU defaults: fp32, roberta-base (4096 tokens, 768x768, r=8) and a 4096x4096 layer (1024 tokens, r=16).
CUDA defaults: the kernels issue's targets, 8192 tokens at 4096x4096 r=16 and 768x768 r=8.
"""
import argparse

import torch

from lorakern import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 rounds: proves the pipeline end to end")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="folder for lora_linear.{json,md,png}")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--malloc", default="default", choices=("keep", "default"),
                        help="default: the C library's allocator as a user's process has it (default); keep: freed "
                             "memory kept for reuse, as `lorakern bench --malloc keep` (a tuned extra)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.quick:
        shapes, rounds = bench.SHAPES_QUICK, 2
    else:
        shapes, rounds = (bench.SHAPES_GPU if args.device == "cuda" else bench.SHAPES_CPU), args.rounds
    bench.run(shapes, dtype, args.device, args.out, rounds=rounds, draw=args.plot,
              keep_memory=args.malloc == "keep")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
