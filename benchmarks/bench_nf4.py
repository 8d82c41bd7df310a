"""NF4 against bitsandbytes: quantize, dequantize and a 4-bit layer's forward, side by side.

    python benchmarks/bench_nf4.py [--device cpu] [--rows 4096 --cols 4096 --tokens 256] [--out DIR]
"""
import argparse

from lorakern import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = bench.measure_nf4(args.rows, args.cols, args.tokens, args.device, args.rounds)
    table = bench.nf4_markdown(rows)
    bench.report(table, args.out, "nf4", device=args.device, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
