#!/usr/bin/env bash
# On a CUDA machine, most wanted first: the issues' two GPU targets (the mixed-adapter batch, #14, and DoRA, #15;
# each also checks its results against float64 torch), the kernel tests compiled (not interpreted), the kernel
# and QLoRA benchmarks, then `lorakern check` on CUDA. Writes its logs and tables to $OUT (default:
# ./device_out). Budget: <= 8 minutes in all: the steps' timeouts are ceilings that add up to 470 seconds (a step
# cut short still leaves its log; rerun that step alone).
#
# Compiles set the pace (a second or more per config, and an autotuner compiles and times every config of its
# table for each new (M, N, K, R)): the test steps and `check` run with LORAKERN_AUTOTUNE=0 (one config per
# kernel; tests/test_kernels_gpu_configs.py checks every config under the interpreter on CPU) and, where
# pytest-xdist is installed, on 8 processes. The benchmarks autotune.
#
#   OUT=/some/dir bash benchmarks/device_check.sh
#
# The lent H200 has python3 with torch, triton, pytest, hypothesis, transformers and peft, and no network:
# lorakern installs without dependencies and without build isolation.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
status=0

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"

$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3

XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
TESTS="env LORAKERN_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider $XDIST -x"

# 1. Mixed batch at #14's target: bf16, 8192 tokens, 4096 x 4096, r = 16, 8 adapters; y, dx, dA, dB against
#    float64 torch, then forward (target <= 1.10x) and forward + backward against the frozen base x W^T
#    (cuBLAS). 50 seconds at most.
timeout 50 $PY benchmarks/bench_mixed.py --device cuda --tokens 8192 --shape 4096x4096 --rank 16 --adapters 8 \
  --rounds 5 --out "$OUT" 2>&1 | tee "$OUT/mixed.txt" || status=1

# 2. DoRA at #15's target: bf16, 8192 tokens, 4096 x 4096, r = 16; y, dx, dA, dB, dm against float64 torch,
#    forward + backward against plain LoRA on the same kernels (target <= 1.10x) and against PEFT's DoRA.
#    55 seconds at most.
timeout 55 $PY benchmarks/bench_dora.py --device cuda --tokens 8192 --shape 4096x4096 --rank 16 --rounds 5 \
  --out "$OUT" 2>&1 | tee "$OUT/dora.txt" || status=1

# 3. The single-adapter kernels compiled against the float64 reference: the fixed cases (the kernels' hypothesis
#    draws would compile for a new shape each). 80 seconds at most.
timeout 80 $TESTS tests/test_kernels_interpreted.py tests/test_layer.py \
  -k "not (kernels_interpreted and (test_matches_reference or kernels_match_reference))" 2>&1 \
  | tee "$OUT/tests.txt" || status=1

# 4. The segmented kernels of mixed-adapter batches against the float64 reference (the fixed cases), then with
#    DoRA slots (HAS_MAGNITUDE: three fixed cases, fp32 at R_PAD 16, dense without and with dropout, NF4 with
#    it). 50 seconds at most.
timeout 50 $TESTS tests/test_kernels_mixed.py tests/test_kernels_mixed_dora.py \
  -k "not assignments and (not mixed_dora or spread or dropout-per-slot or nf4_matches_reference[dropout])" 2>&1 \
  | tee "$OUT/mixed_tests.txt" || status=1

# 5. DoRA on the kernels against lorakern.core.dora (the fixed cases). 45 seconds at most.
timeout 45 $TESTS tests/test_kernels_dora.py -k "explicit or spoiled or z_is_kept" 2>&1 \
  | tee "$OUT/dora_tests.txt" || status=1

# 6. The kernel benchmark: bf16 at the issue's target shapes (90 seconds at most).
#    M = 8192 tokens; 4096 x 4096 and 768 x 768 at r = 8 and 16; every provider installed there.
timeout 90 lorakern bench --device cuda --dtype bfloat16 --shapes 4096x4096,768x768 --ranks 8,16 --tokens 8192 \
  --rounds 3 --out "$OUT" --plot 2>&1 | tee "$OUT/bench.txt" || status=1

# 7. QLoRA: NF4 forward at M = 1, 16, 4096, 8192 and a training step (bitsandbytes and PEFT rows appear
#    where they are installed; carry their wheels, see the device tool's README). 50 seconds at most.
timeout 50 $PY benchmarks/bench_qlora.py --device cuda --rounds 5 --out "$OUT" 2>&1 | tee "$OUT/qlora.txt" || status=1

# 8. Every path on CUDA against the reference, one config per kernel (50 seconds at most).
timeout 50 env LORAKERN_AUTOTUNE=0 lorakern check --device cuda 2>&1 | tee "$OUT/check.txt" || status=1

exit $status
