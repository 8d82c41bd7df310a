"""Every kernel and autotune config compiled for sm_80 and sm_90 on this (GPU-less) machine.

Both weight formats: a dense W and the NF4 (QLoRA) base decoded inside the GEMM; the single-adapter kernels,
their DoRA variants (dora_*, with and without dropout) and the segmented kernels of mixed-adapter batches
(mixed_fwd, mixed_bwd; with DoRA slots mixed_dora_*). Registers and spills
come from the log of the ptxas -v that Triton runs to build each cubin; shared memory from the compiled metadata. A config that spills, overflows shared memory, or (sm_90, 16-bit) runs without
wgmma fails here and is to be removed from kernels/configs.py's table, not hidden.
"""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "reports.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, "-m", "lorakern.kernels.compile_check", "--arch", "80", "--arch", "90",
         "--dtype", "bfloat16", "--dtype", "float32", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert out.exists(), f"compile_check crashed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), done


def test_every_config_compiles_cleanly(reports):
    results, done = reports
    bad = [r for r in results if r["problems"]]
    assert not bad, "configs with problems:\n" + "\n".join(
        f"{r['kernel']} {r['dtype']} sm_{r['arch']} R_PAD={r['r_pad']} {r['config']}: {r['problems']}" for r in bad)
    assert done.returncode == 0, done.stdout[-2000:]


def test_every_kernel_arch_dtype_and_rank_is_covered(reports):
    from lorakern.kernels import lora_linear as kl

    results, _ = reports
    seen = {(r["kernel"], r["weight"], r["dtype"], r["arch"], r["r_pad"]) for r in results}
    # mixed_*: the segmented kernels of mixed batches; dora_*: the kernels with DoRA's magnitude (dora_drop_*: and
    # dropout); mixed_dora_*: the segmented kernels with DoRA slots
    kinds = ("fwd", "bwd", "small", "mixed_fwd", "mixed_bwd", "dora_fwd", "dora_bwd", "dora_small", "dora_drop_fwd",
             "dora_drop_bwd", "dora_drop_small", "mixed_dora_fwd", "mixed_dora_bwd", "mixed_dora_drop_fwd",
             "mixed_dora_drop_bwd")
    expected = {(k, w, d, a, p) for k in kinds for w in ("dense", "nf4") for d in ("bfloat16", "float32")
                for a in (80, 90) for p in kl.RANK_PADS}
    assert seen == expected
    assert all(r["registers"] > 0 and r["shared_bytes"] > 0 for r in results)


def test_sm90_tensor_core_configs_use_wgmma(reports):
    results, _ = reports
    big = [r for r in results if r["arch"] == 90 and r["dtype"] == "bfloat16" and r["tensor_cores_expected"]]
    assert len(big) >= 20 and all(r["wgmma"] for r in big)
    assert not any(r["wgmma"] for r in results if r["arch"] == 80), "wgmma exists on sm_90 only"


_PTX = """//
.version 8.7
.target sm_90a
\t.file\t1 "/work/a/kernels/forward.py"
\t.globl\t_lora_fwd_kernel
.visible .entry _lora_fwd_kernel(
{
$L__tmp0:
\t.loc\t1 55 19
\tmov.u32 \t%r1, %ctaid.x;
\tadd.s32 \t%r2, %r1, 127;
}
\t.section\t.debug_str
{
.b8 95
}
"""


def test_compare_ptx_ignores_line_info_and_catches_one_changed_instruction(tmp_path):
    """What --ptx-dir folders are diffed on: a moved helper (other .loc/.file lines, other debug sections)
    leaves the code identical; one changed instruction or one reordered pair does not."""
    from lorakern.kernels.compile_check import _spread, compare_ptx

    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    (before / "fwd.ptx").write_text(_PTX)
    moved = (_PTX.replace("/work/a/kernels/forward.py", "/work/b/kernels/loops.py").replace("55 19", "40 9")
             .replace("$L__tmp0:", "$L__tmp3:").replace(".b8 95", ".b8 96"))
    (after / "fwd.ptx").write_text(moved)
    (after / "bwd.ptx").write_text(_PTX)
    identical, differing, unmatched = compare_ptx(str(before), str(after))
    assert (identical, differing, unmatched) == (["fwd.ptx"], {}, ["bwd.ptx"])
    for changed in (moved.replace("127;", "128;"),
                    moved.replace("\tmov.u32 \t%r1, %ctaid.x;\n\tadd.s32 \t%r2, %r1, 127;",
                                  "\tadd.s32 \t%r2, %r1, 127;\n\tmov.u32 \t%r1, %ctaid.x;")):
        (after / "fwd.ptx").write_text(changed)
        identical, differing, _ = compare_ptx(str(before), str(after))
        assert not identical and list(differing) == ["fwd.ptx"]
    # --sample: first to last, evenly; all of them when asked for as many or more
    assert _spread(7, 1) == [3] and _spread(7, 2) == [0, 6] and _spread(7, 3) == [0, 3, 6]
    assert _spread(2, 5) == [0, 1] and _spread(4, None) == [0, 1, 2, 3]


_LOG_PATHS = """
import json, os, sys
from triton.runtime.cache import get_cache_manager
from lorakern.kernels import compile_check as cc
job = ("small", "bfloat16", 90, 16, 0)
reports = [cc.compile_one(*job)]                 # built: the log of Triton's own ptxas run
reports.append(cc.compile_one(*job))             # from Triton's cache: the log kept beside the cubin
entries = [os.path.join(os.environ["TRITON_CACHE_DIR"], d) for d in os.listdir(os.environ["TRITON_CACHE_DIR"])]
kept = [os.path.join(d, f) for d in entries for f in os.listdir(d) if f == cc.PTXAS_LOG]
for path in kept:
    os.unlink(path)
reports.append(cc.compile_one(*job))             # cached without a log: built again in a scratch cache
json.dump({"reports": [[r.registers, r.spill_bytes, r.shared_bytes] for r in reports], "kept": len(kept),
           "kept_again": sum(f == cc.PTXAS_LOG for d in entries for f in os.listdir(d))}, sys.stdout)
"""


def test_registers_come_from_the_ptxas_log_whether_built_or_cached(tmp_path):
    """Registers and spills are read from Triton's own ptxas run: on a build, from a cached cubin (the log kept
    beside it), and from a cached cubin without a log (built again in a scratch cache); all three agree."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", _LOG_PATHS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    first = out["reports"][0]
    assert first[0] > 0 and out["reports"] == [first] * 3
    assert out["kept"] >= 1 and out["kept_again"] == out["kept"]
