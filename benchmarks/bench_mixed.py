"""Mixed-adapter batches on the segmented Triton kernels: correctness against float64 torch, then speed.

    python benchmarks/bench_mixed.py --device cuda [--out DIR]   # the issue's GPU target, on a lent GPU
    python benchmarks/bench_mixed.py --quick                     # tiny shapes, interpreted on CPU: proves it runs
    python benchmarks/bench_mixed.py --device cuda --dora 4      # the first 4 adapters DoRA (run_mixed_dora)

Rows spread evenly (shuffled) over the adapters, each with its own rank-r A and B and scaling, a few
base-only rows. Checks y, dx and every adapter's dA and dB against the same computation in float64 (per
row, its adapter), each element's error relative to the magnitude of its terms, against the bound of
lorakern.testing (the tests' rule). Then times, side by side (< 1: lorakern faster):
- forward: run_mixed against the frozen base x W^T alone (cuBLAS) — the issue's target <= 1.10 at bf16,
  8192 tokens, 4096 x 4096, r = 16, 8 adapters;
- forward + backward (dx and every dA, dB) against the frozen base's forward + dx.
With --dora N the first N adapters are DoRA (a trained magnitude each: the checks add dm, the reference
forms W + s B A in float64 for the norm), and the timings add the same batch with every adapter plain on
the same kernels (what the DoRA slots cost: the norms, the scale in the epilogue, z and dm).
Exit status 1 when a correctness check fails.
"""
from types import SimpleNamespace

import torch

# first: without CUDA, importing lorakern.kernels turns the interpreter on before anything imports triton
from lorakern.kernels.mixed_ops import run_mixed  # isort: skip
from lorakern.kernels.mixed_dora_ops import run_mixed_dora  # isort: skip
from lorakern import bench
from lorakern.testing import TOLERANCE, bound


def make_call(tokens: int, K: int, N: int, r: int, adapters: int, device: str, dtype: torch.dtype, seed: int = 0,
              dora: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    W = rand(N, K) / K ** 0.5
    x = rand(tokens, K).requires_grad_(True)
    slots = [(rand(r, K) / K ** 0.5, rand(N, r) / r ** 0.5, 2.0 * (a + 1) / r, 0.0) for a in range(adapters)]
    for A, B, _, _ in slots:
        A.requires_grad_(True)
        B.requires_grad_(True)
    base_rows = max(tokens // 64, 1) if tokens > 1 else 0  # a few rows on the base alone
    slot = torch.arange(tokens) % adapters
    slot[:base_rows] = -1
    slot = slot[torch.randperm(tokens, generator=gen)].to(device)
    key = torch.where(slot < 0, adapters, slot)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=adapters + 1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])[: adapters + 1]
    magnitudes = [(rand(N).abs() + 0.5).requires_grad_(True) if a < dora else None for a in range(adapters)]
    # the fields of lorakern.dispatch.MixedCall
    return SimpleNamespace(x=x, base="dense", weight=W, bias=None, adapters=slots, slot=slot, order=order,
                           offsets=offsets, counts=tuple(counts.tolist()), seed=None,
                           magnitudes=magnitudes if dora else None, base_norm_sq=None)


def _run(call):
    return run_mixed(call) if call.magnitudes is None else run_mixed_dora(call)


def _params(call) -> list:
    """Every adapter's A and B, then the DoRA slots' magnitudes."""
    return [t for A, B, _, _ in call.adapters for t in (A, B)] + [m for m in call.magnitudes or [] if m is not None]


def check(call) -> list[dict]:
    """Worst relative error of y, dx, dA, dB (over adapters) and dm (DoRA slots) against float64, with the tests'
    bound (plus two roundings, c and c z, as lorakern.testing_dora's, with DoRA slots)."""
    x, W = call.x, call.weight
    M, K = x.shape
    N = W.shape[0]
    grad_y = torch.randn(M, N, device=x.device, dtype=x.dtype)
    params = _params(call)
    y = _run(call)
    got = torch.autograd.grad(y, [x, *params], grad_y)
    d = lambda t: t.detach().double()
    x64, W64, g64 = d(x), d(W), d(grad_y)
    y_ref, y_mag = x64 @ W64.t(), x64.abs() @ W64.abs().t()
    dx_ref, dx_mag = g64 @ W64, g64.abs() @ W64.abs()
    rows = {"y": [], "dx": [], "dA": [], "dB": []} | ({"dm": []} if call.magnitudes else {})
    refs, dms = [], []
    for a, (A, B, s, _) in enumerate(call.adapters):
        i = (call.slot == a).nonzero().squeeze(1)
        A64, B64 = d(A), d(B)
        m = None if call.magnitudes is None else call.magnitudes[a]
        # a DoRA slot: c = m / ||W + s B A|| (rows), y = c z, the backward LoRA's on g c, dm = sum_rows(g z) / n
        n = torch.linalg.vector_norm(W64 + s * B64 @ A64, dim=1) if m is not None else None
        c = torch.ones_like(W64[:, 0]) if m is None else d(m) / n
        g, gm = g64[i] * c, g64[i].abs() * c.abs()
        u, gB = x64[i] @ A64.t(), g @ B64
        z, z_mag = x64[i] @ W64.t() + s * u @ B64.t(), y_mag[i] + s * (x64[i].abs() @ A64.abs().t()) @ B64.abs().t()
        y_ref[i], y_mag[i] = c * z, c.abs() * z_mag
        dx_ref[i], dx_mag[i] = g @ W64 + s * gB @ A64, gm @ W64.abs() + s * (gm @ B64.abs()) @ A64.abs()
        refs.append(("dA", s * gB.t() @ x64[i], s * (gm @ B64.abs()).t() @ x64[i].abs()))
        refs.append(("dB", s * g.t() @ u, s * gm.t() @ (x64[i].abs() @ A64.abs().t())))
        if m is not None:
            dms.append(("dm", (g64[i] * z).sum(0) / n, (g64[i].abs() * z_mag).sum(0) / n))
    tiny = torch.finfo(x.dtype).tiny
    worst = lambda a, e, m: float(((d(a) - e).abs() / (m + tiny)).max()) if e.numel() else 0.0
    rows["y"].append(worst(y, y_ref, y_mag))
    rows["dx"].append(worst(got[0], dx_ref, dx_mag))
    for (name, expected, magnitude), actual in zip(refs + dms, got[1:]):
        rows[name].append(worst(actual, expected, magnitude))
    limit = bound(x.dtype, max(M, K, N)) + (2 * TOLERANCE[x.dtype][0] if call.magnitudes else 0.0)
    return [{"check": name, "worst_rel_error": max(values), "bound": limit, "ok": max(values) <= limit}
            for name, values in rows.items()]


def timing(call, rounds: int, device: str) -> list[dict]:
    x, W = call.x, call.weight
    params = _params(call)
    plain = SimpleNamespace(**{**vars(call), "magnitudes": None})
    plain_params = [t for A, B, _, _ in call.adapters for t in (A, B)]
    grad = torch.randn(x.shape[0], W.shape[0], device=device, dtype=x.dtype)
    xf = x.detach().requires_grad_(True)

    def mixed_fwd():
        with torch.no_grad():
            return _run(call)

    def plain_fwd():
        with torch.no_grad():
            return run_mixed(plain)

    def base_fwd():
        return x.detach() @ W.t()

    def mixed_train():
        torch.autograd.grad(_run(call), [x, *params], grad)

    def plain_train():
        torch.autograd.grad(run_mixed(plain), [x, *plain_params], grad)

    def base_train():
        torch.autograd.grad(xf @ W.t(), [xf], grad)

    cases = {"mixed fwd": mixed_fwd, "base fwd": base_fwd, "mixed fwd+bwd": mixed_train, "base fwd+bwd": base_train}
    if call.magnitudes:
        cases.update({"plain fwd": plain_fwd, "plain fwd+bwd": plain_train})
    samples = bench.interleaved(cases, rounds, device)
    best = {name: min(values) for name, values in samples.items()}
    dora = [] if not call.magnitudes else [
        {"benchmark": f"{label}, DoRA slots", "reference": "the same adapters plain (run_mixed)",
         "lorakern_ms": best[f"mixed {key}"], "reference_ms": best[f"plain {key}"],
         "ratio": best[f"mixed {key}"] / best[f"plain {key}"]}
        for label, key in (("forward", "fwd"), ("forward + backward", "fwd+bwd"))]
    return dora + [{"benchmark": f"forward, {len(call.adapters)} adapters", "reference": "x W^T (frozen base)",
             "lorakern_ms": best["mixed fwd"], "reference_ms": best["base fwd"],
             "ratio": best["mixed fwd"] / best["base fwd"]},
            {"benchmark": f"forward + backward, {len(call.adapters)} adapters", "reference": "x W^T, dx (frozen base)",
             "lorakern_ms": best["mixed fwd+bwd"], "reference_ms": best["base fwd+bwd"],
             "ratio": best["mixed fwd+bwd"] / best["base fwd+bwd"]}]


def main(argv=None) -> int:
    parser = bench.gpu_script_parser(__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--dora", type=int, default=0, help="how many of the adapters are DoRA (the first ones)")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    K, N = (int(v) for v in args.shape.split("x"))
    tokens, rank, adapters, rounds = args.tokens, args.rank, args.adapters, args.rounds
    if args.quick:
        tokens, K, N, rank, adapters, rounds = 70, 40, 36, 4, 3, 1
    call = make_call(tokens, K, N, rank, adapters, args.device, dtype, dora=min(args.dora, adapters))
    checks = check(call)
    times = timing(call, rounds, args.device)
    shape = f"{dtype}, {tokens} tokens, {K}x{N}, r={rank}, {adapters} adapters, {args.device}"
    shape += f" ({min(args.dora, adapters)} DoRA)" if args.dora else ""
    return bench.finish_checked("Mixed-adapter batch", "mixed", shape, checks, times, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
