"""Triton kernels for lorakern, installed as ``lorakern.kernels``.

This folder is mapped onto ``lorakern.kernels`` by setup.py (``package_dir``) so that no top-level
package named ``kernels`` is ever installed: bitsandbytes and transformers import an unrelated
``kernels`` package when one is importable.

Kernel files register themselves with ``lorakern.functional.register_backend`` when imported.
No kernel family has landed yet, so ``BACKENDS`` is empty and ``LORAKERN_BACKEND=triton`` reports
that clearly instead of running anything.
"""
from __future__ import annotations

# Names of the kernel modules in this package that provide a backend, in load order.
BACKENDS: tuple[str, ...] = ()


def triton_available() -> bool:
    """True when triton can be imported (its kernels can then run, compiled or interpreted)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
