"""lorakern/native/lora_cpu.c on targets Python cannot reach here: built with a cross compiler into a small C
program (tests/cross/lora_selftest.c) that checks every output against a double-precision loop, run under
qemu-user. aarch64 (NEON, four lanes) needs `aarch64-linux-gnu-gcc` and `qemu-aarch64` (Debian:
gcc-aarch64-linux-gnu, qemu-user) and skips, saying so, without them; the host's own ISA levels run the same
program natively, so the self-check itself is tested wherever a C compiler is."""
import math
import os
import shutil
import subprocess

import pytest
import torch

from lorakern import native
from lorakern.testing import bound

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(native.HERE, "lora_cpu.c"), os.path.join(HERE, "cross", "lora_selftest.c")]
# the longest reduction in the program's shapes is 123 (K or N)
BOUND = bound(torch.float32, 123)


def _run(compiler, flags, runner, out, limit):
    exe = str(out / "selftest")
    subprocess.run([compiler, "-O3", "-fopenmp", *flags, *SOURCES, "-o", exe, "-lm"], check=True, capture_output=True,
                   text=True, timeout=300)
    return subprocess.run([*runner, exe, repr(limit)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("level", [level.name for level in native.levels_here()])
def test_host_levels_pass_the_self_check(tmp_path, level):
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler {compiler!r}")
    chosen = next(lv for lv in native.levels_here() if lv.name == level)
    flags = [*chosen.flags, f"-DLANES={chosen.lanes}"]
    done = _run(compiler, flags, [], tmp_path, BOUND)
    assert done.returncode == 0, done.stdout + done.stderr
    worst = float(done.stdout.split("worst relative error ")[1].split(",")[0])
    assert 0 < worst <= BOUND
    # the self-check can fail: the same outputs against a bound below their error
    assert _run(compiler, flags, [], tmp_path, worst / 4).returncode == 1


def test_aarch64_neon_build_passes_the_self_check_under_qemu(tmp_path):
    compiler, qemu = "aarch64-linux-gnu-gcc", "qemu-aarch64"
    missing = [tool for tool in (compiler, qemu) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: gcc-aarch64-linux-gnu, qemu-user)")
    level = native.LEVELS["aarch64"][0]
    flags = [*level.flags, f"-DLANES={level.lanes}"]
    runner = [qemu, "-L", "/usr/aarch64-linux-gnu"]
    done = _run(compiler, flags, runner, tmp_path, BOUND)
    assert done.returncode == 0, done.stdout + done.stderr
    worst = float(done.stdout.split("worst relative error ")[1].split(",")[0])
    assert 0 < worst <= BOUND and math.isfinite(worst)
    assert _run(compiler, flags, runner, tmp_path, worst / 4).returncode == 1
