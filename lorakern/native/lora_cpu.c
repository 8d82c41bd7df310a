/* The rank-r parts of a LoRA linear layer on the CPU, fp32: one pass over the rows forward, two backward.
 *
 *   forward:  u = x~ A^T                      (M x r, kept for the backward)
 *             y = b + s u B^T                 (M x N, the base GEMM then accumulates x W^T onto it)
 *   backward: gB = g B                        (a chunk of 64 rows at a time, never the whole M x r)
 *             dx~ = s gB A                    (M x K, the base GEMM then accumulates g W onto it)
 *             dA = s gB^T x~,  dB^T = s u^T g (r x K and r x N, per-thread partial sums, then reduced;
 *                                             dB in a pass over g of its own, see lora_backward_f32)
 *
 * Why: BLAS runs these thin products (one side of extent r = 4..64) far below the memory bandwidth, and
 * each one is a separate pass over an M x K or M x N operand. Here four rows of x~ (or of g) are read
 * once, from L1, for every product that needs them. Shapes: x~ (M, K), A (r, K), Bt = B^T (r, N),
 * g (M, N), u (M, r); every matrix row-major and contiguous.
 *
 * One source for every CPU: LANES (floats per vector, -DLANES=16/8/4) is the only compile-time choice,
 * set by lorakern/native/__init__.py for the ISA level it builds (AVX-512: 16, AVX2: 8, SSE2 or NEON: 4)
 * so that one `vf` is one machine register. The vectors are GCC/Clang vector extensions; no intrinsics
 * outside the optional streaming store (vectors.h). The sums run in another order than BLAS's (LANES lanes,
 * then a horizontal sum), so fp32 results differ from it by rounding.
 *
 * One translation unit in five parts (the .h files of lora_cpu/, included below in order): the static helpers are shared
 * and every kernel is compiled for the same LANES. lorakern/native/__init__.py hashes this file and its
 * parts into the build's cache key. */
#include "lora_cpu/vectors.h"
#include "lora_cpu/plain.h"
#include "lora_cpu/mixed.h"
#include "lora_cpu/dora.h"
#include "lora_cpu/mixed_dora.h"
