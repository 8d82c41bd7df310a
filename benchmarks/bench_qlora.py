"""QLoRA layers side by side: lorakern's NF4 path against a bf16 matmul, dequantize + matmul, bitsandbytes
(and PEFT + bitsandbytes for a training step) when they are installed.

    python benchmarks/bench_qlora.py --device cuda [--out DIR]     # the issue's GPU targets, on a lent GPU
    python benchmarks/bench_qlora.py --quick                       # tiny shapes on CPU: proves it runs

Rows, each a ratio measured in the same run (< 1: lorakern is faster than the reference):
- decoding (M <= 16) and prefill (M >= 4096) forward of one 4096 x 4096 NF4 layer with LoRA r = 16;
- a training step (forward + backward) through a stack of such layers.
"""
import argparse
import warnings

import torch
from torch import nn

from lorakern import LoraLinear, bench


def _bnb():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes

        return bitsandbytes
    except ImportError:
        return None


def forward_rows(width: int, tokens: list[int], device: str, dtype: torch.dtype, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    linear = nn.Linear(width, width, bias=False).to(device=device, dtype=dtype)
    layer = LoraLinear.from_linear(linear, quantize="nf4", compute_dtype=dtype, lora_dtype=dtype, r=16).to(device)
    nn.init.normal_(layer.lora_B, std=0.01)
    layer.eval()
    weight = linear.weight.detach()
    bnb = _bnb()
    theirs = None
    if bnb is not None:
        theirs = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=dtype, quant_type="nf4")
        theirs.load_state_dict({"weight": weight.float().cpu()})
        theirs = theirs.to(device)
    out = []
    with torch.no_grad():
        for m in tokens:
            x = torch.randn(m, width, device=device, dtype=dtype)
            candidates = {
                "lorakern NF4 + LoRA": lambda: layer(x),
                f"{dtype} matmul (dense W)": lambda: x @ weight.t(),
                "dequantize + matmul": lambda: x @ layer.nf4.dequantize(dtype).t(),
            }
            if theirs is not None:
                candidates["bitsandbytes Linear4bit"] = lambda: theirs(x)
            samples = bench.interleaved(candidates, rounds, device, calls=3)
            mine = min(samples["lorakern NF4 + LoRA"])
            for name, values in samples.items():
                if name != "lorakern NF4 + LoRA":
                    out.append({"benchmark": f"forward M={m}", "reference": name, "lorakern_ms": mine,
                                "reference_ms": min(values), "ratio": mine / min(values)})
    return out


def training_rows(width: int, layers: int, tokens: int, device: str, dtype: torch.dtype, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device=device, dtype=dtype)
    ours = nn.Sequential(*[LoraLinear.from_linear(l, quantize="nf4", compute_dtype=dtype, lora_dtype=dtype, r=16)
                           for l in stack]).to(device)
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    candidates = {"lorakern QLoRA": ours}
    bnb = _bnb()
    if bnb is not None and bench._importable("peft"):  # the peer row needs both
        from peft import LoraConfig, get_peft_model

        quantized = nn.Sequential()
        for i, l in enumerate(stack):
            q = bnb.nn.Linear4bit(width, width, bias=True, compute_dtype=dtype, quant_type="nf4")
            q.load_state_dict({k: v.float().cpu() for k, v in l.state_dict().items()})
            quantized.add_module(str(i), q)
        quantized = quantized.to(device)
        candidates["PEFT + bitsandbytes"] = get_peft_model(
            quantized, LoraConfig(r=16, lora_alpha=16, target_modules=[str(i) for i in range(layers)]))

    def step(model):
        def run():
            y = model(x)
            torch.autograd.grad(y.float().pow(2).mean(), [x] + [p for p in model.parameters() if p.requires_grad])
        return run

    samples = bench.interleaved({name: step(model) for name, model in candidates.items()}, rounds, device)
    mine = min(samples["lorakern QLoRA"])
    return [{"benchmark": f"training step, {layers} x {width}^2, M={tokens}", "reference": name, "lorakern_ms": mine,
             "reference_ms": min(values), "ratio": mine / min(values)}
            for name, values in samples.items() if name != "lorakern QLoRA"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.quick:
        width, tokens, layers, train_tokens, rounds = 256, [1, 16, 64], 2, 64, 2
    else:
        width, tokens, layers, train_tokens, rounds = 4096, [1, 16, 4096, 8192], 4, 4096, args.rounds
    rows = forward_rows(width, tokens, args.device, dtype, rounds)
    rows += training_rows(width, layers, train_tokens, args.device, dtype, rounds)
    table = bench.reference_markdown(rows)
    bench.report(table, args.out, "qlora", device=args.device, dtype=str(dtype), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
