"""DoRA on the Triton kernels: correctness against float64 torch, then speed against plain LoRA and PEFT.

    python benchmarks/bench_dora.py --device cuda [--out DIR]   # the issue's GPU target, on a lent GPU
    python benchmarks/bench_dora.py --quick                     # tiny shapes, interpreted on CPU: proves it runs

One dense layer (W, b frozen; A, B, the magnitude m trained, m 10% above the row norms of W + s B A so that
c = m / n is not 1). Checks y, dx, dA, dB and dm of lorakern's DoRA on the triton backend against the same
computation in float64 with the norm taken from W + s B A formed (as PEFT does), each element's error
relative to the magnitude of its terms, against the bound of lorakern.testing plus DoRA's two roundings (the
tests' rule). Then times, interleaved (< 1: the first faster):
- forward + backward (dx, dA, dB, dm) of DoRA against plain LoRA's (dx, dA, dB), both on the triton kernels:
  the issue's target <= 1.10 at bf16, 8192 tokens, 4096 x 4096, r = 16;
- the same against PEFT's DoRA Linear (when peft is installed), and the forwards alone.
Exit status 1 when a correctness check fails.
"""
import torch

# first: without CUDA, importing lorakern.kernels turns the interpreter on before anything imports triton
from lorakern.kernels import lora_linear  # noqa: F401  isort: skip
from lorakern import bench, dispatch
from lorakern.dora import row_norms_sq
from lorakern.testing import TOLERANCE, bound


def check(o, m, norm_sq, backend: str) -> list[dict]:
    """Worst relative error of y, dx, dA, dB, dm against float64 torch (B A formed there, for the norm)."""
    y = dispatch.lora_forward(o.x, "dense", o.W, o.b, [(o.A, o.B, o.s, 0.0, m)], requested=backend,
                              base_norm_sq=norm_sq)
    got = torch.autograd.grad(y, [o.x, o.A, o.B, m], o.grad)
    d = lambda t: t.detach().double()
    x, W, b, A, B, g, mm = d(o.x), d(o.W), d(o.b), d(o.A), d(o.B), d(o.grad), d(m)
    n = (W + o.s * B @ A).norm(dim=1)
    c = mm / n
    u, z = x @ A.t(), x @ W.t() + o.s * (x @ A.t()) @ B.t()
    gc = g * c
    refs = {"y": c * z + b, "dx": gc @ W + o.s * (gc @ B) @ A, "dA": o.s * (gc @ B).t() @ x, "dB": o.s * gc.t() @ u,
            "dm": (g * z).sum(0) / n}
    ax, aW, aA, aB, ag, ac = x.abs(), W.abs(), A.abs(), B.abs(), g.abs(), c.abs()
    az = ax @ aW.t() + o.s * (ax @ aA.t()) @ aB.t()
    mags = {"y": ac * az + b.abs(), "dx": (ag * ac) @ aW + o.s * ((ag * ac) @ aB) @ aA,
            "dA": o.s * ((ag * ac) @ aB).t() @ ax, "dB": o.s * (ag * ac).t() @ (ax @ aA.t()),
            "dm": (ag * az).sum(0) / n}
    tiny = torch.finfo(o.x.dtype).tiny
    M, K = o.x.shape
    limit = bound(o.x.dtype, max(M, K, o.W.shape[0])) + 2 * TOLERANCE[o.x.dtype][0]
    out = []
    for (name, ref), actual in zip(refs.items(), [y, *got]):
        worst = float(((d(actual) - ref).abs() / (mags[name] + tiny)).max())
        out.append({"check": name, "worst_rel_error": worst, "bound": limit, "ok": worst <= limit})
    return out


def timing(o, m, norm_sq, backend: str, rounds: int, device: str) -> list[dict]:
    def dora():
        return dispatch.lora_forward(o.x, "dense", o.W, o.b, [(o.A, o.B, o.s, 0.0, m)], requested=backend,
                                     base_norm_sq=norm_sq)

    def lora():
        return dispatch.lora_forward(o.x, "dense", o.W, o.b, [(o.A, o.B, o.s, 0.0)], requested=backend)

    candidates = {"DoRA fwd+bwd": lambda: torch.autograd.grad(dora(), [o.x, o.A, o.B, m], o.grad),
                  "LoRA fwd+bwd": lambda: torch.autograd.grad(lora(), [o.x, o.A, o.B], o.grad)}
    with_peft = bench._importable("peft")
    if with_peft:
        peft = bench._peft_dora(o)
        candidates["PEFT DoRA fwd+bwd"] = lambda: torch.autograd.grad(peft.forward(), peft.params, o.grad)
    fwd = {"DoRA fwd": dora, "LoRA fwd": lora} | ({"PEFT DoRA fwd": peft.forward} if with_peft else {})
    for name, fn in fwd.items():
        candidates[name] = lambda fn=fn: _no_grad(fn)
    best = {name: min(values) for name, values in bench.interleaved(candidates, rounds, device).items()}
    pairs = [("DoRA fwd+bwd", "LoRA fwd+bwd"), ("DoRA fwd", "LoRA fwd")]
    if with_peft:
        pairs += [("DoRA fwd+bwd", "PEFT DoRA fwd+bwd"), ("DoRA fwd", "PEFT DoRA fwd")]
    return [{"benchmark": f"lorakern {a} ({backend})", "reference": b, "lorakern_ms": best[a], "reference_ms": best[b],
             "ratio": best[a] / best[b]} for a, b in pairs]


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def main(argv=None) -> int:
    parser = bench.gpu_script_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", help="lorakern's backend for DoRA and LoRA (default triton)")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    K, N = (int(v) for v in args.shape.split("x"))
    tokens, rank, rounds = args.tokens, args.rank, args.rounds
    if args.quick:
        tokens, K, N, rank, rounds = 40, 45, 37, 5, 1
    o = bench.make_operands(bench.Shape("dora", tokens, K, N, rank), dtype, args.device)
    m, norm_sq = bench._magnitude(o), row_norms_sq(o.W)  # the layer caches ||W_i||^2 of its frozen base
    checks = check(o, m, norm_sq, args.backend)
    times = timing(o, m, norm_sq, args.backend, rounds, args.device)
    shape = f"{dtype}, {tokens} tokens, {K}x{N}, r={rank}, {args.device}"
    return bench.finish_checked("DoRA", "dora", shape, checks, times, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
