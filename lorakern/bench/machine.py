"""The machine and process lorakern bench reports beside its numbers: CPU model and vector flags, the C
kernels' build, package versions, and the allocator setting (``keep_freed_memory``, ``--malloc keep``)."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from typing import Optional

import torch

_MALLOC = "default"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for the next allocation of this process: the heap top is
    never trimmed, and buffers up to 32 MiB live on the heap from the first one on (32 MiB is the most
    glibc's own adaptive threshold reaches; larger ones stay mmapped as by default: with them on the heap
    too, posix_memalign's slack let the heap grow by a whole buffer per round in a measured loop).
    Returns what was set (also reported by ``machine()["malloc"]``). Process-wide and not undone: for a
    benchmark process, not a library call. Raises ValueError where the C library is not glibc (pass
    ``--malloc default`` there)."""
    global _MALLOC
    import ctypes

    libc_name, _ = platform.libc_ver()
    libc = ctypes.CDLL(None)
    if libc_name != "glibc" or not hasattr(libc, "mallopt"):
        raise ValueError(f"--malloc keep needs glibc's mallopt; this C library is {libc_name or 'unknown'!r}: "
                         "pass --malloc default")
    trim, mmap = 2**31 - 1, 32 * 2**20
    if not (libc.mallopt(_M_TRIM_THRESHOLD, trim) and libc.mallopt(_M_MMAP_THRESHOLD, mmap)):
        raise ValueError("glibc refused mallopt(M_TRIM_THRESHOLD / M_MMAP_THRESHOLD); pass --malloc default")
    _MALLOC = f"glibc, freed memory kept: mallopt M_TRIM_THRESHOLD={trim}, M_MMAP_THRESHOLD={mmap}"
    return _MALLOC


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    from lorakern.native import cpu_info

    return cpu_info().get("model name") or platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide which kernels run (lorakern's C builds, MKL's and ATen's code paths):
# RESULTS.md gives them beside each machine's numbers.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
                "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "sve2")


def cpu_flags() -> str:
    """This CPU's VECTOR_FLAGS, space-separated ("flags" on x86, "Features" on aarch64)."""
    from lorakern.native import cpu_info

    info = cpu_info()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return " ".join(flag for flag in VECTOR_FLAGS if flag in have)


def c_kernels() -> str:
    """The ISA level lorakern's C kernels were built for, or why they serve no call here."""
    from lorakern import native

    level, why = native.build_status()
    return level or f"not built: {why}"


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or installed without metadata
        return None


def machine() -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_flags": cpu_flags(),
        "c_kernels": c_kernels(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc": _MALLOC,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lorakern": _version("lorakern"),
    }
    for package in ("triton", "peft", "loralib", "bitsandbytes"):
        info[package] = _version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
