"""A small C library for the NF4 codec on CPU, compiled on first use; torch code serves without it.

It is compiled with the system C compiler (``cc``, override with $CC) into a cache folder
($LORAKERN_CACHE, default ~/.cache/lorakern) under a name that hashes the source and flags, written
atomically, and loaded with ctypes. Without a compiler (or with LORAKERN_NATIVE=0) ``library()`` is None
and callers use their torch path; both give the same bits (tests/test_native.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from typing import Optional

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nf4_cpu.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_LIBRARY: Optional[ctypes.CDLL] = None
_TRIED = False


def _build() -> Optional[ctypes.CDLL]:
    compiler = os.environ.get("CC", "cc")
    with open(SOURCE, "rb") as handle:
        digest = hashlib.sha256(handle.read() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    folder = os.environ.get("LORAKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lorakern"))
    target = os.path.join(folder, f"nf4_cpu-{digest}.so")
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nf4_cpu-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, SOURCE, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    library = ctypes.CDLL(target)
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.blockwise_quantize_f32.argtypes = [pointer, i64, i64, pointer, i64, ctypes.c_int, pointer, pointer]
    library.blockwise_quantize_f32.restype = None
    library.nf4_decode_f32.argtypes = [pointer, i64, i64, i64, pointer, pointer, pointer]
    library.nf4_decode_f32.restype = None
    return library


def library() -> Optional[ctypes.CDLL]:
    """The compiled library, or None where it cannot be built (or LORAKERN_NATIVE=0, read on every call)."""
    global _LIBRARY, _TRIED
    if os.environ.get("LORAKERN_NATIVE", "1") == "0":
        return None
    if not _TRIED:
        _TRIED = True
        try:
            _LIBRARY = _build()
        except (OSError, subprocess.SubprocessError):
            _LIBRARY = None
    return _LIBRARY
