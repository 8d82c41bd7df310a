"""Small C libraries for the CPU, compiled on first use; torch code serves without them.

``library()``: the NF4 codec (nf4_cpu.c, bit-identical to the torch path, so no fused multiply-adds).
``lora_library()``: the rank-r products of a LoRA layer (lora_cpu.c, fp32, fused multiply-adds allowed).
Each is compiled with the system C compiler (``cc``, override with $CC) into a cache folder
($LORAKERN_CACHE, default ~/.cache/lorakern) under a name that hashes the source, the flags and the CPU
(-march=native builds for this CPU), written atomically, and loaded with ctypes. Without a compiler (or
with LORAKERN_NATIVE=0) each is None and callers use their torch path (tests/test_native.py,
tests/test_native_lora.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
_POINTER, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# name -> (compiler flags, {function: (result type, argument types)})
_LIBRARIES = {
    "nf4_cpu": (
        ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"],
        {
            "blockwise_quantize_f32": (None, [_POINTER, _I64, _I64, _POINTER, _I64, _INT, _POINTER, _POINTER]),
            "nf4_decode_f32": (None, [_POINTER, _I64, _I64, _I64, _POINTER, _POINTER, _POINTER]),
        },
    ),
    "lora_cpu": (
        ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"],
        {
            "lora_forward_f32": (None, [_POINTER] * 4 + [_FLOAT] + [_I64] * 4 + [_POINTER] * 2 + [_INT]),
            "lora_backward_f32": (None, [_POINTER] * 5 + [_FLOAT] + [_I64] * 4 + [_POINTER] * 4 + [_INT]),
            "lora_backward_scratch": (_I64, [_I64, _I64, _I64, _INT]),
        },
    ),
}
_LOADED: dict[str, Optional[ctypes.CDLL]] = {}
_DISABLED = 0


@contextlib.contextmanager
def disabled():
    """Within the block every caller takes its torch path, as with LORAKERN_NATIVE=0 (benchmarks compare
    the two side by side). A layer's backward follows the path its forward took."""
    global _DISABLED
    _DISABLED += 1
    try:
        yield
    finally:
        _DISABLED -= 1


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags", ...); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as handle:
            first = handle.read().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def _cpu_signature() -> str:
    """What -march=native compiles for: a cache folder shared by machines with other CPUs (a home directory
    on NFS) must not hand one machine's AVX-512 build to another without it."""
    import platform

    info = cpu_info()
    fields = [info[key] for key in ("vendor_id", "model name", "flags", "Features", "CPU part") if key in info]
    return "|".join(fields) if fields else f"{platform.machine()}|{platform.processor()}"


def _build(name: str) -> ctypes.CDLL:
    flags, functions = _LIBRARIES[name]
    source = os.path.join(HERE, f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    with open(source, "rb") as handle:
        key = handle.read() + " ".join([compiler, *flags, _cpu_signature()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    folder = os.environ.get("LORAKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lorakern"))
    target = os.path.join(folder, f"{name}-{digest}.so")
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, source, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    loaded = ctypes.CDLL(target)
    for function, (restype, argtypes) in functions.items():
        getattr(loaded, function).argtypes = argtypes
        getattr(loaded, function).restype = restype
    return loaded


def _get(name: str) -> Optional[ctypes.CDLL]:
    if _DISABLED or os.environ.get("LORAKERN_NATIVE", "1") == "0":
        return None
    if name not in _LOADED:
        try:
            _LOADED[name] = _build(name)
        except (OSError, subprocess.SubprocessError):
            _LOADED[name] = None
    return _LOADED[name]


def library() -> Optional[ctypes.CDLL]:
    """The NF4 codec, or None where it cannot be built (or LORAKERN_NATIVE=0, read on every call)."""
    return _get("nf4_cpu")


def lora_library() -> Optional[ctypes.CDLL]:
    """The LoRA rank-r products, or None where they cannot be built (or LORAKERN_NATIVE=0, read on every call)."""
    return _get("lora_cpu")
