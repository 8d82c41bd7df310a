"""Compile every kernel and autotune config for real GPUs on a machine without one.

    python -m lorakern.kernels.compile_check --arch 80 --arch 90 [--kernel mixed_fwd] [--json report.json]
        [--ptx-dir DIR] [--sample N]

For each (kernel, dtype, config, arch, padded rank) this builds PTX and a cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, reads registers and spill bytes
from the log of the ``ptxas -v`` that Triton runs to build the cubin (the compiled kernel's n_regs stays
empty until it is loaded on a device; ``_compile_with_ptxas_log``), the shared memory from the metadata, and
whether the PTX uses wgmma.
It must run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled.

--ptx-dir writes each case's PTX to DIR/<kernel>-<weight>-<dtype>-sm<arch>-r<R_PAD>-c<config index>.ptx, so
two trees' kernels can be diffed (a refactor that must not change the compiled code, a reviewer's check);
--sample N compiles only N configs per (kernel, weight, dtype, R_PAD), spread evenly over its list.
--compare-ptx BEFORE AFTER compiles nothing: it diffs two such folders case by case, ignoring only the debug
line info (ptx_code), and fails when any case's code differs.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# Largest dynamic shared memory one block may use: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("bfloat16", "float16", "float32")
WEIGHTS = ("dense", "nf4")
# fwd, bwd, small: the single-adapter kernels; mixed_fwd, mixed_bwd: the segmented kernels of mixed batches;
# dora_fwd, dora_bwd, dora_small: the single-adapter kernels with DoRA's magnitude (HAS_MAGNITUDE, z kept, dm),
# without dropout; dora_drop_*: the same with dropout (a second accumulator: more registers)
DORA_KINDS = ("dora_fwd", "dora_bwd", "dora_small", "dora_drop_fwd", "dora_drop_bwd", "dora_drop_small")
# mixed_dora_*: the segmented kernels with DoRA slots (HAS_MAGNITUDE), without and with dropout
MIXED_DORA_KINDS = ("mixed_dora_fwd", "mixed_dora_bwd", "mixed_dora_drop_fwd", "mixed_dora_drop_bwd")
KINDS = ("fwd", "bwd", "small", "mixed_fwd", "mixed_bwd") + DORA_KINDS + MIXED_DORA_KINDS
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


@dataclass
class Report:
    kernel: str
    weight: str
    dtype: str
    arch: int
    r_pad: int
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit: int
    wgmma: bool
    tensor_cores_expected: bool

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared memory {self.shared_bytes} > {self.shared_limit}")
        if self.arch >= 90 and self.tensor_cores_expected and not self.wgmma:
            out.append("no wgmma on sm_90")
        return out


# the row grouping and per-slot scalars of the segmented kernels (mixed_launchers.py passes these dtypes)
_SEGMENT_PTRS = {"order_ptr": "*i64", "offsets_ptr": "*i64", "ranks_ptr": "*i32", "scaling_ptr": "*fp32",
                 "dropout_ptr": "*fp32", "dora_ptr": "*i32"}


def _signature(kind: str, dtype: str, r_pad: int, meta: dict, weight: str = "dense"):
    """(signature, constexprs, attrs) of a typical launch, specialised as Triton's JIT would specialise it:
    contiguous inner strides (== 1), 16-byte aligned pointers, and strides, N and K multiples of 16
    (true of every real model's layers; M, the token count, is left free)."""
    import triton.language as tl

    from lorakern.kernels.backward import _lora_bwd_kernel
    from lorakern.kernels.forward import _lora_fwd_kernel
    from lorakern.kernels.mixed_backward import _mixed_bwd_kernel
    from lorakern.kernels.mixed_forward import _mixed_fwd_kernel
    from lorakern.kernels.small_m import _lora_small_m_kernel

    # the plain kernels compile with dropout on (their worst case); DoRA's both ways (dora_drop_*: on)
    if kind.startswith("mixed_dora_"):
        dora, dropout = True, kind.startswith("mixed_dora_drop_")
        kind = "mixed_" + kind.removeprefix("mixed_dora_").removeprefix("drop_")
    else:
        dora, dropout = kind.startswith("dora_"), not kind.startswith("dora_") or kind.startswith("dora_drop_")
        kind = kind.removeprefix("dora_").removeprefix("drop_")
    kernel = {"fwd": _lora_fwd_kernel, "bwd": _lora_bwd_kernel, "small": _lora_small_m_kernel,
              "mixed_fwd": _mixed_fwd_kernel, "mixed_bwd": _mixed_bwd_kernel}[kind]
    ptr = _PTR[dtype]
    constexprs = dict(meta)
    # DoRA's switches (off for plain LoRA): the magnitude scale, z kept (forward), dm (backward)
    if kind in ("fwd", "small", "mixed_fwd"):
        constexprs.update(HAS_MAGNITUDE=dora, STORE_Z=dora)
    elif kind in ("bwd", "mixed_bwd"):
        constexprs.update(HAS_MAGNITUDE=dora, NEED_DC=dora)
    constexprs.update(R_PAD=r_pad, DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                      UPCAST=False, ACC_DTYPE=tl.float32)
    nf4 = weight == "nf4"
    constexprs.update(W_NF4=nf4, W_NESTED=nf4)
    if not nf4:
        constexprs["wq_blocksize"] = 1  # dense launches pass 1, which the JIT specialises as a constant
    if kind == "small":
        constexprs.update(HAS_BIAS=True, HAS_DROPOUT=dropout)
        inner_strides = {"stride_xk", "stride_ak", "stride_br"} | ({"stride_wk"} if not nf4 else set())
        fp32_ptrs = {"y_ptr", "u_ptr", "c_ptr", "z_ptr"}
    elif kind in ("fwd", "mixed_fwd"):
        constexprs.update(HAS_BIAS=True, HAS_DROPOUT=dropout)
        inner_strides = {"stride_xk", "stride_ak", "stride_br", "stride_yn", "stride_ur"} | ({"stride_wk"} if not nf4 else set())
        fp32_ptrs = {"c_ptr"}
    else:
        constexprs.update(HAS_DROPOUT=dropout, NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_DBIAS=True)
        inner_strides = {"stride_gn", "stride_ak", "stride_br", "stride_xk", "stride_ur", "stride_dxk"} | (
            {"stride_wk"} if not nf4 else set())
        fp32_ptrs = {"da_ptr", "db_ptr", "dbias_ptr", "c_ptr", "dc_ptr"}
    for name in inner_strides:
        constexprs[name] = 1
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _SEGMENT_PTRS:
                signature[name] = _SEGMENT_PTRS[name]
            elif nf4 and name in ("w_ptr", "wq_absmax_ptr"):
                signature[name] = "*u8"
            elif nf4 and name.startswith("wq_"):
                signature[name] = "*fp32"
            else:
                signature[name] = "*fp32" if name in fp32_ptrs else ptr
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("scaling", "dropout_p", "wq_offset"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("N", "K", "wq_blocksize"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return kernel, signature, constexprs, attrs


def ptx_name(kind: str, dtype: str, arch: int, r_pad: int, config_index: int, weight: str = "dense") -> str:
    return f"{kind}-{weight}-{dtype}-sm{arch}-r{r_pad}-c{config_index}.ptx"


def compile_one(kind: str, dtype: str, arch: int, r_pad: int, config_index: int, weight: str = "dense",
                ptx_dir: str | None = None) -> Report:
    ptx_path = None if ptx_dir is None else os.path.join(ptx_dir, ptx_name(kind, dtype, arch, r_pad, config_index,
                                                                           weight))
    return compile_config(kind, dtype, arch, r_pad, _configs(kind, dtype, r_pad, weight)[config_index], weight,
                          ptx_path)


def _configs(kind: str, dtype: str, r_pad: int, weight: str) -> list:
    import torch

    from lorakern.kernels.configs import compiled_configs, compiled_small_m_configs

    if kind.endswith("small"):
        return compiled_small_m_configs(getattr(torch, dtype), weight, kind)
    return compiled_configs(kind, getattr(torch, dtype), r_pad, weight)


def compile_config(kind: str, dtype: str, arch: int, r_pad: int, config, weight: str = "dense",
                   ptx_path: str | None = None) -> Report:
    """Compile one triton.Config of one kernel for sm_<arch> and report on it (its PTX also to ptx_path)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs = _signature(kind, dtype, r_pad, config.kwargs, weight)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    compiled, log = _compile_with_ptxas_log(ASTSource(kernel, signature, constexprs, attrs), target,
                                            options.__dict__)
    ptx = compiled.asm["ptx"]
    if ptx_path is not None:
        from lorakern._io import atomic_write_bytes

        atomic_write_bytes(ptx_path, ptx.encode())
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=-1)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    config_text = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    config_text += f", warps={config.num_warps}, stages={config.num_stages}"
    return Report(
        kernel=kind, weight=weight, dtype=dtype, arch=arch, r_pad=r_pad, config=config_text, registers=registers,
        spill_bytes=spills, shared_bytes=int(compiled.metadata.shared), shared_limit=SHARED_LIMIT[arch],
        wgmma="wgmma.mma_async" in ptx,
        tensor_cores_expected=(not kind.endswith("small") and dtype != "float32" and config.kwargs["BLOCK_M"] >= 64
                               and config.num_warps >= 4),
    )


# the name under which a cubin's ptxas log is kept in its entry of Triton's cache
PTXAS_LOG = "ptxas.log"


def _compile_with_ptxas_log(source, target, options: dict):
    """(the compiled kernel, the log of the ``ptxas -v`` that built its cubin).

    Triton runs ptxas with -v itself, with the flags a GPU build uses (--regAllocOptLevel among them), and
    prints the log when asked (``knobs.nvidia.dump_ptxas_log``); the registers and spills read from it are
    those of the cubin a launch would load, and no second ptxas run is needed (a third of a config's compile
    time). The log is kept in the kernel's entry of Triton's cache, whose key covers everything that makes the
    cubin; a kernel that comes from the cache without one (built before logs were kept) is built again in a
    scratch cache to get it."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.runtime.cache import get_cache_manager

    def build():
        printed = io.StringIO()
        before = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(printed):
                compiled = triton.compile(source, target=target, options=options)
        finally:
            knobs.nvidia.dump_ptxas_log = before
        return compiled, printed.getvalue()

    compiled, log = build()
    cache = get_cache_manager(compiled.hash)
    if "Used " not in log:  # the cubin came from Triton's cache: no ptxas ran
        kept = cache.get_file(PTXAS_LOG)
        if kept is not None:
            with open(kept) as handle:
                return compiled, handle.read()
        before = knobs.cache.dir
        with tempfile.TemporaryDirectory() as scratch:
            knobs.cache.dir = scratch
            try:
                compiled, log = build()
            finally:
                knobs.cache.dir = before
        if "Used " not in log:
            raise RuntimeError(f"no ptxas log from Triton's build of {source.fn.__name__} for sm_{target.arch}:\n"
                               f"{log[-2000:]}")
    cache.put(log, PTXAS_LOG, binary=False)
    return compiled, log


def _spread(count: int, sample: int | None) -> list[int]:
    """Indices of ``sample`` of ``count`` configs, first to last evenly (the middle one alone for 1)."""
    if sample is None or sample >= count:
        return list(range(count))
    if sample == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (sample - 1)) for i in range(sample)})


def all_jobs(archs=(80, 90), dtypes=DTYPES, weights=WEIGHTS, kinds=KINDS, sample: int | None = None) -> list[tuple]:
    from lorakern.kernels.configs import RANK_PADS

    jobs = []
    for kind in kinds:
        for weight in weights:
            for dtype in dtypes:
                for r_pad in RANK_PADS:
                    for index in _spread(len(_configs(kind, dtype, r_pad, weight)), sample):
                        for arch in archs:
                            jobs.append((kind, dtype, arch, r_pad, index, weight))
    return jobs


def _run(job, ptx_dir=None):
    return compile_one(*job, ptx_dir=ptx_dir)


def run(archs=(80, 90), dtypes=DTYPES, weights=WEIGHTS, workers: int = 2, kinds=KINDS, ptx_dir: str | None = None,
        sample: int | None = None) -> list[Report]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("compile checks need compiled kernels: run with TRITON_INTERPRET=0")
    jobs = all_jobs(archs, dtypes, weights, kinds, sample)
    if ptx_dir is not None:
        os.makedirs(ptx_dir, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(functools.partial(_run, ptx_dir=ptx_dir), jobs))


def markdown(reports: list[Report]) -> str:
    rows = ["| kernel | weight | dtype | arch | R_PAD | config | regs | spill B | shared B | wgmma | ok |",
            "|---|---|---|---|---|---|---:|---:|---:|---|---|"]
    for r in reports:
        rows.append(f"| {r.kernel} | {r.weight} | {r.dtype} | sm_{r.arch} | {r.r_pad} | {r.config} | {r.registers} | "
                    f"{r.spill_bytes} | {r.shared_bytes} | {'yes' if r.wgmma else 'no'} | "
                    f"{'; '.join(r.problems) or 'ok'} |")
    return "\n".join(rows)


def ptx_code(ptx: str) -> list[str]:
    """The lines of a PTX that make up its code: without the .loc and .file line info, the $L__tmp labels
    only that info refers to, and the .debug_* sections, which change whenever the kernels' source moves
    (a helper's line, the file it lives in) while the instructions stay the same."""
    lines = []
    for line in ptx.splitlines(keepends=True):
        if re.match(r"\s*\.section\s+\.debug", line):
            break
        if not re.match(r"\s*\.(loc|file)\b|\$L__tmp\d+:", line):
            lines.append(line)
    return lines


def compare_ptx(before: str, after: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(identical, differing: name -> unified diff, unmatched) over the case files of two --ptx-dir folders."""
    names_before, names_after = set(os.listdir(before)), set(os.listdir(after))
    identical, differing = [], {}
    for name in sorted(names_before & names_after):
        with open(os.path.join(before, name)) as old, open(os.path.join(after, name)) as new:
            a, b = ptx_code(old.read()), ptx_code(new.read())
        if a == b:
            identical.append(name)
        else:
            differing[name] = list(difflib.unified_diff(a, b, f"{before}/{name}", f"{after}/{name}", n=1))
    return identical, differing, sorted(names_before ^ names_after)


def _compare_main(before: str, after: str) -> int:
    identical, differing, unmatched = compare_ptx(before, after)
    for name, diff in differing.items():
        print(f"{name}: code differs")
        sys.stdout.writelines(diff[:40])
    print(f"{len(identical)} cases identical, {len(differing)} differ, {len(unmatched)} in one folder only")
    return 1 if differing or not identical else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--sample {value}: give a number of configs >= 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--weight", action="append", choices=WEIGHTS, help="dense W or the NF4 (QLoRA) base")
    parser.add_argument("--kernel", action="append", choices=KINDS, help="only these kernels (default: all)")
    parser.add_argument("--json", help="also write the reports as JSON here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ptx-dir", help="also write each case's PTX into this folder (made if absent)")
    parser.add_argument("--sample", type=_positive, help="only N configs per (kernel, weight, dtype, R_PAD), spread")
    parser.add_argument("--compare-ptx", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compile nothing: diff the code of two --ptx-dir folders")
    args = parser.parse_args(argv)
    if args.compare_ptx:
        return _compare_main(*args.compare_ptx)
    reports = run(tuple(args.arch or (80, 90)), tuple(args.dtype or DTYPES), tuple(args.weight or WEIGHTS),
                  workers=args.workers, kinds=tuple(args.kernel or KINDS), ptx_dir=args.ptx_dir, sample=args.sample)
    print(markdown(reports))
    if args.json:
        from lorakern._io import atomic_write_bytes

        payload = [dict(asdict(r), problems=r.problems) for r in reports]
        atomic_write_bytes(args.json, json.dumps(payload, indent=2).encode())
    bad = [r for r in reports if r.problems]
    print(f"{len(reports)} compiled, {len(bad)} with problems")
    return 1 if bad else 0


def _compiled_mode() -> None:
    """Undo the interpreter default that importing lorakern.kernels applies on machines without CUDA,
    unless a kernel module (and with it triton, interpreted) is already imported."""
    from lorakern import kernels

    loaded = [name for name in sys.modules
              if name.startswith("lorakern.kernels.") and name != "lorakern.kernels.compile_check"]
    if kernels.INTERPRETER_DEFAULTED and not loaded:
        os.environ["TRITON_INTERPRET"] = "0"


if __name__ == "__main__":
    _compiled_mode()
    sys.exit(main())
