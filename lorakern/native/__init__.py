"""Small C libraries for the CPU, compiled on first use; torch code serves without them.

``library()``: the NF4 codec (nf4_cpu.c, bit-identical to the torch path, so no fused multiply-adds).
``lora_library()``: the rank-r products of a LoRA layer and DoRA's scaled epilogue (lora_cpu.c, fp32, fused
multiply-adds allowed).

One translation unit per library (lora_cpu.c includes its parts from lora_cpu/), built for an ISA level (``LEVELS``): ``avx512`` (x86-64 with AVX-512 F/BW/DQ/VL,
16 floats per vector), ``avx2`` (x86-64 with AVX2 and FMA, 8), ``generic`` (any x86-64: SSE2, 4; or any
aarch64: NEON, 4; or any other target GCC or Clang compiles for, 4). The best level this CPU can execute
(read from /proc/cpuinfo) is built, unless $LORAKERN_ISA caps it lower (so one machine can test and
measure the lower builds too). Each build is compiled with the system C compiler (``cc``, override with
$CC) into a cache folder ($LORAKERN_CACHE, default ~/.cache/lorakern) under a name that hashes the
source and its parts, the flags, the compiler and the CPU, written atomically, and loaded with ctypes.

Where a build fails (no compiler, or a compiler error) the library is None, callers use their torch path,
and one warning per library and level says why, with the compiler's first lines of error;
``build_status()`` gives the same for ``lorakern check``. LORAKERN_NATIVE=0 switches both off silently.
"""
from __future__ import annotations

import contextlib
import functools
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

from lorakern import _env

HERE = os.path.dirname(os.path.abspath(__file__))
LORA_MAX_RANK = 256  # lora_cpu.c keeps four rows' r coefficients on the stack
ISA_ENV = "LORAKERN_ISA"
_POINTER, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


@dataclass(frozen=True)
class Level:
    """One ISA level: its compiler flags, the CPU flags (/proc/cpuinfo) it needs, floats per vector."""

    name: str
    flags: tuple[str, ...]
    cpu_flags: frozenset[str]
    lanes: int


_X86_V3 = ("-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2")
# best first, per machine architecture
LEVELS: dict[str, tuple[Level, ...]] = {
    "x86_64": (
        Level("avx512", ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", *_X86_V3),
              frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c", "bmi1", "bmi2"}), 16),
        Level("avx2", _X86_V3, frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2"}), 8),
        Level("generic", ("-march=x86-64",), frozenset(), 4),
    ),
    "aarch64": (Level("generic", ("-march=armv8-a",), frozenset(), 4),),
}
_OTHER_ARCH = (Level("generic", (), frozenset(), 4),)

# name -> (compiler flags, {function: (result type, argument types)})
_LIBRARIES = {
    "nf4_cpu": (
        ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"),
        {
            "blockwise_quantize_f32": (None, [_POINTER, _I64, _I64, _POINTER, _I64, _INT, _POINTER, _POINTER]),
            "nf4_decode_f32": (None, [_POINTER, _I64, _I64, _I64, _POINTER, _POINTER, _POINTER]),
        },
    ),
    "lora_cpu": (
        ("-O3", "-fopenmp", "-shared", "-fPIC"),
        {
            "lora_forward_f32": (None, [_POINTER] * 4 + [_FLOAT] + [_I64] * 4 + [_POINTER] * 2 + [_INT]),
            "lora_backward_f32": (None, [_POINTER] * 5 + [_FLOAT] + [_I64] * 4 + [_POINTER] * 4 + [_INT]),
            "lora_backward_scratch": (_I64, [_I64, _I64, _I64, _INT]),
            "lora_mixed_forward_f32": (None, [_POINTER] * 3 + [_I64] + [_POINTER] * 5 + [_I64] * 4 + [_POINTER] * 2
                                       + [_INT]),
            "lora_mixed_backward_f32": (None, [_POINTER] * 5 + [_I64] + [_POINTER] * 4 + [_I64] * 4
                                        + [_POINTER] * 4 + [_INT]),
            "lora_mixed_backward_scratch": (_I64, [_I64, _I64, _POINTER, _POINTER, _I64, _INT]),
            "lora_transpose_f32": (None, [_POINTER, _I64, _I64, _POINTER]),
            "lora_transpose_many_f32": (None, [_POINTER, _POINTER, _I64, _I64, _POINTER]),
            "dora_forward_f32": (None, [_POINTER] * 5 + [_FLOAT] + [_I64] * 4 + [_POINTER] * 3 + [_INT, _INT]),
            "dora_scale_grad_f32": (None, [_POINTER] * 3 + [_I64] * 2 + [_POINTER] * 3 + [_INT]),
            "dora_backward_f32": (None, [_POINTER] * 5 + [_FLOAT] + [_I64] * 4 + [_POINTER] * 7 + [_INT]),
            "dora_backward_scratch": (_I64, [_I64, _I64, _I64, _INT]),
            "dora_norm_f32": (_I64, [_POINTER] * 5 + [_FLOAT] + [_I64] * 3 + [_POINTER, _INT]),
            "lora_merge_f32": (None, [_POINTER] * 3 + [_FLOAT, _POINTER] + [_I64] * 3 + [_POINTER, _INT]),
            "dora_merge_f32": (_I64, [_POINTER] * 6 + [_FLOAT] + [_I64] * 3 + [_POINTER] * 3 + [_INT]),
            "dora_mixed_forward_f32": (None, [_POINTER] * 3 + [_I64] + [_POINTER] * 7 + [_I64] * 4 + [_POINTER] * 3
                                       + [_INT]),
            "dora_mixed_scale_grad_f32": (None, [_POINTER] * 3 + [_I64] + [_POINTER] * 2 + [_I64] * 2 + [_POINTER] * 3
                                          + [_INT]),
            "dora_mixed_scale_grad_scratch": (_I64, [_I64, _POINTER, _I64, _INT]),
        },
    ),
}


def pointer(tensor) -> Optional[int]:
    """The address a C function takes for ``tensor`` (a torch tensor), or None (NULL) for None."""
    return None if tensor is None else tensor.data_ptr()


class NativeBuildError(OSError):
    """A C library could not be built: the compiler is missing or failed (the message has its first lines)."""


_LOADED: dict[tuple[str, str], Optional[ctypes.CDLL]] = {}
_FAILURES: dict[tuple[str, str], str] = {}
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


@functools.lru_cache(maxsize=None)
def _read_cpu_info() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo") as handle:
            first = handle.read().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags", ...); empty where there is none."""
    return dict(_read_cpu_info())


def _cpu_signature() -> str:
    """The CPU the cache key names: a cache folder shared by machines with other CPUs (a home directory on
    NFS) must not hand one machine's AVX-512 build to another without it."""
    info = cpu_info()
    fields = [info[key] for key in ("vendor_id", "model name", "flags", "Features", "CPU part") if key in info]
    return "|".join(fields) if fields else f"{platform.machine()}|{platform.processor()}"


def _architecture_levels(machine: Optional[str] = None) -> tuple[Level, ...]:
    machine = (machine or platform.machine()).lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return LEVELS.get(machine, _OTHER_ARCH)


@functools.lru_cache(maxsize=8)
def _levels_with(flags_line: str, machine: str) -> tuple[Level, ...]:
    """The levels of ``machine`` whose CPU flags ``flags_line`` has (cached: asked on every LoRA call)."""
    flags = set(flags_line.split())
    return tuple(level for level in _architecture_levels(machine) if level.cpu_flags <= flags)


def levels_here() -> list[Level]:
    """The ISA levels this CPU can execute, best first (ignores $LORAKERN_ISA)."""
    return list(_levels_with(cpu_info().get("flags", ""), platform.machine()))


def chosen_level() -> Level:
    """The level the libraries are built for: the best this CPU executes, or $LORAKERN_ISA's (a lower one).
    A name that is not a level, or one this CPU cannot execute, raises ValueError with the choices."""
    return _level_for(_env.get(ISA_ENV, ""), cpu_info().get("flags", ""), platform.machine())


@functools.lru_cache(maxsize=16)
def _level_for(requested: str, flags_line: str, machine: str) -> Level:
    """``chosen_level`` for these $LORAKERN_ISA, CPU flags and machine (cached: asked on every LoRA call; a
    ValueError is raised again each time, never cached)."""
    here = list(_levels_with(flags_line, machine))
    requested = requested.strip().lower()
    if not requested or requested == "auto":
        return here[0]
    names = [level.name for level in _architecture_levels(machine)]
    if requested not in names:
        raise ValueError(f"{ISA_ENV}={requested!r} is not an ISA level of {machine}; set it to one of "
                         f"{', '.join(names)} (or unset it for the best this CPU runs: {here[0].name})")
    for level in here:
        if level.name == requested:
            return level
    missing = next(level for level in _architecture_levels(machine) if level.name == requested).cpu_flags
    missing = sorted(missing - set(flags_line.split()))
    raise ValueError(f"{ISA_ENV}={requested!r} needs CPU flags this CPU lacks ({', '.join(missing)}); set it to one "
                     f"of {', '.join(level.name for level in here)} or unset it")


def _source_bytes(name: str) -> list[bytes]:
    """The text of library ``name``'s source and of the parts it includes (the .h files in the folder of the
    same name, e.g. lora_cpu/), in a fixed order: what the build's cache key hashes, so that an edit to any
    part builds anew."""
    paths = [os.path.join(HERE, f"{name}.c")]
    parts = os.path.join(HERE, name)
    if os.path.isdir(parts):
        paths += [os.path.join(parts, f) for f in sorted(os.listdir(parts)) if f.endswith(".h")]
    contents = []
    for path in paths:
        with open(path, "rb") as handle:
            contents.append(os.path.basename(path).encode() + b"\0" + handle.read())
    return contents


def build(name: str, level: Level) -> ctypes.CDLL:
    """Compile (or take from the cache) library ``name`` for ``level`` and load it.

    Raises NativeBuildError naming the compiler and its first lines of error."""
    base_flags, functions = _LIBRARIES[name]
    flags = [*base_flags, *level.flags, f"-DLANES={level.lanes}"]
    source = os.path.join(HERE, f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    key = b"".join(_source_bytes(name)) + " ".join([compiler, *flags, _cpu_signature()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    folder = os.environ.get("LORAKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lorakern"))
    target = os.path.join(folder, f"{name}-{level.name}-{digest}.so")
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
        os.close(fd)
        command = [compiler, *flags, source, "-o", tmp, "-lm"]
        try:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except FileNotFoundError:
                raise NativeBuildError(f"no C compiler {compiler!r} found; install gcc or clang, or set $CC to one") from None
            except subprocess.TimeoutExpired:
                raise NativeBuildError(f"{compiler} took over 300 s to build {name}.c") from None
            if done.returncode != 0:
                lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][:6]
                raise NativeBuildError(
                    f"{compiler} failed to build {name}.c for {level.name} (exit {done.returncode}): "
                    + (" | ".join(lines) or "no message") + f" [command: {' '.join(command)}]"
                )
            os.replace(tmp, target)  # atomic: a killed build leaves no half-written library under the name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    loaded = ctypes.CDLL(target)
    for function, (restype, argtypes) in functions.items():
        getattr(loaded, function).argtypes = argtypes
        getattr(loaded, function).restype = restype
    return loaded


def _get(name: str, level: Optional[Level] = None) -> Optional[ctypes.CDLL]:
    if _DISABLED or _env.get("LORAKERN_NATIVE", "1") == "0":
        return None
    level = level or chosen_level()
    key = (name, level.name)
    if key not in _LOADED:
        try:
            _LOADED[key] = build(name, level)
        except OSError as exc:  # NativeBuildError, or a build the loader refuses
            _LOADED[key] = None
            _FAILURES[key] = str(exc)
            warnings.warn(f"lorakern: the C kernels ({name}.c, {level.name}) are not available, the torch path "
                          f"serves instead: {exc}", RuntimeWarning, stacklevel=3)
    return _LOADED[key]


def build_status(name: str = "lora_cpu") -> tuple[Optional[str], Optional[str]]:
    """(the ISA level built, None) when library ``name`` is in use, else (None, why not)."""
    if os.environ.get("LORAKERN_NATIVE", "1") == "0":
        return None, "switched off by LORAKERN_NATIVE=0"
    try:
        level = chosen_level()
    except ValueError as exc:
        return None, str(exc)
    if _get(name, level) is None:
        return None, _FAILURES.get((name, level.name), "not built")
    return level.name, None


def library(level: Optional[Level] = None) -> Optional[ctypes.CDLL]:
    """The NF4 codec, or None where it cannot be built (or LORAKERN_NATIVE=0, read on every call)."""
    return _get("nf4_cpu", level)


def lora_library(level: Optional[Level] = None) -> Optional[ctypes.CDLL]:
    """The LoRA rank-r products for ``level`` (default: ``chosen_level()``), or None where they cannot be
    built (or LORAKERN_NATIVE=0, read on every call)."""
    return _get("lora_cpu", level)
