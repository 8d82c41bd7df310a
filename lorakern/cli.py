"""The ``lorakern`` command."""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakern", description="LoRA layers with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare every available path against the float64 reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    from lorakern.harness.cli import add_commands, main_error

    add_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "check":
        from lorakern.check import run_check

        return 0 if run_check(args.device) else 1
    try:
        return args.handler(args)
    except ValueError as exc:  # bad input: the message names the value and the fix
        return main_error(exc)


if __name__ == "__main__":
    sys.exit(main())
