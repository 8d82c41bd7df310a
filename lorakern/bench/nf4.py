"""``lorakern bench --nf4``: lorakern's NF4 codec and 4-bit layer against bitsandbytes'."""
from __future__ import annotations

import torch

from lorakern.bench.timing import interleaved


def measure_nf4(rows: int, cols: int, tokens: int, device: str, rounds: int = 5) -> list[dict]:
    """NF4 against bitsandbytes, side by side: quantize, dequantize, and a forward through the 4-bit layer.

    Rows report each lorakern time and its ratio to bitsandbytes' time for the same operation (< 1 is
    faster), and whether both produced the same bits.
    """
    import warnings

    from lorakern.quant import LinearNF4, NF4Storage, quantize_nf4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) / cols ** 0.5).to(device)
    x = torch.randn(tokens, cols, generator=gen).to(device)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = NF4Storage(quantize_nf4(w, 64, double_quant=False))
    linear = torch.nn.Linear(cols, rows, bias=False).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    ours_layer = LinearNF4.from_linear(linear, double_quant=False)
    theirs_layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                     compress_statistics=False)
    theirs_layer.load_state_dict(linear.state_dict())
    theirs_layer = theirs_layer.to(device)
    pairs = {
        "quantize": (lambda: quantize_nf4(w, 64, double_quant=False),
                     lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)),
        "dequantize": (lambda: ours.dequantize(torch.float32), lambda: bnbf.dequantize_4bit(packed, state)),
        "forward (4-bit layer)": (lambda: ours_layer(x), lambda: theirs_layer(x)),
    }
    same = {"quantize": bool(torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
                             and torch.equal(ours.absmax, state.absmax)),
            "dequantize": None, "forward (4-bit layer)": None}
    out = []
    with torch.no_grad():
        for name, (mine, theirs) in pairs.items():
            samples = interleaved({"lorakern": mine, "bitsandbytes": theirs}, rounds, device)
            out.append({"operation": name, "shape": f"{rows}x{cols}", "tokens": tokens if "forward" in name else None,
                        "lorakern_ms": min(samples["lorakern"]), "bitsandbytes_ms": min(samples["bitsandbytes"]),
                        "ratio": min(samples["lorakern"]) / min(samples["bitsandbytes"]),
                        "bit_identical": same[name]})
    return out


def nf4_markdown(rows: list[dict]) -> str:
    lines = ["| operation | shape | lorakern ms | bitsandbytes ms | lorakern / bitsandbytes | bit-identical |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        same = "n/a" if r["bit_identical"] is None else ("yes" if r["bit_identical"] else "NO")
        lines.append(f"| {r['operation']} | {r['shape']} | {r['lorakern_ms']:.1f} | {r['bitsandbytes_ms']:.1f} | "
                     f"{r['ratio']:.2f} | {same} |")
    return "\n".join(lines)
