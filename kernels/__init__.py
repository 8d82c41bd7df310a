"""Triton kernels for lorakern, installed as ``lorakern.kernels``.

This folder is mapped onto ``lorakern.kernels`` by setup.py (``package_dir``) so that no top-level
package named ``kernels`` is ever installed: bitsandbytes and transformers import an unrelated
``kernels`` package when one is importable.

Each module named in ``BACKENDS`` registers itself with ``lorakern.dispatch.register`` when
imported. On a machine without CUDA the kernels run under the Triton interpreter (on CPU tensors):
importing them there sets TRITON_INTERPRET=1 unless it is already set. It must be set before triton
itself is first imported (triton decorates its own library functions then): when another package
imported triton earlier, set TRITON_INTERPRET=1 yourself before importing it; until then the kernels
report themselves unavailable and the torch path serves.
"""
from __future__ import annotations

import os

# Names of the kernel modules in this package that provide a backend, in load order.
BACKENDS: tuple[str, ...] = ("lora_linear",)


def triton_available() -> bool:
    """True when triton can be imported (its kernels can then run, compiled or interpreted)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _default_to_interpreter() -> bool:
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
            return True
    return False


# True when this import turned the interpreter on (tools that compile for a GPU turn it off again).
INTERPRETER_DEFAULTED = _default_to_interpreter()
