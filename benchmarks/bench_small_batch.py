"""A whole model at a few tokens per call, where the Python around a LoRA layer's kernels is its cost.

    python benchmarks/bench_small_batch.py [--tokens 16] [--rows 1] [--layers 4] [--rounds 25] [--out DIR]
    python benchmarks/bench_small_batch.py --tokens 1          # one token per call: a decoding step
    python benchmarks/bench_small_batch.py --quick             # a tiny model, 2 rounds: proves it runs

A RoBERTa encoder built from its config (random weights, no download, dropout off): hidden 768, ``--layers``
layers, query and value adapted at r = 8 (alpha 16) by ``lorakern.inject``, B drawn at random so that the
adapters change the output. The same adapters go to PEFT through lorakern's PEFT-format save and PEFT's
``PeftModel.from_pretrained``. Checked first (``check``): PEFT's output equals lorakern's, relative to what the
adapters change, and lorakern's with adapters disabled equals the frozen model's. Then timed,
interleaved (the three models take turns in each round, so a noisy machine slows them alike):
- inference: a ``torch.no_grad()`` forward of ``--rows`` rows of ``--tokens`` tokens;
- training: forward + backward to the LoRA parameters (the base frozen), lorakern against PEFT.
Each row gives the minimum over rounds and the paired ratio (the median over rounds of the per-round ratio).
Not an issue's target: measured for the README's small-batch claims (benchmarks/RESULTS.md). fp32 on the CPU.
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

import lorakern
from lorakern import bench


def build(layers: int, hidden: int, heads: int, seed: int = 0):
    """(frozen RoBERTa, the same with lorakern adapters on query and value, the same adapters under PEFT)."""
    from peft import PeftModel
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=514, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    frozen = RobertaModel(config, add_pooling_layer=False).eval()
    ours = lorakern.inject(copy.deepcopy(frozen), lorakern.LoraConfig(r=8, lora_alpha=16,
                                                                       target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    with tempfile.TemporaryDirectory() as folder:
        lorakern.save_adapter(ours, folder)
        peft = PeftModel.from_pretrained(copy.deepcopy(frozen), folder, is_trainable=True).eval()
    return frozen, ours.eval(), peft


def check(frozen, ours, peft, ids) -> list[dict]:
    """PEFT's output against lorakern's, relative to what the adapters change (max |y_PEFT - y_lorakern| over
    max |y_lorakern - y_frozen|, within 1e-4: measured 3e-6 to 7e-6 (fp32 rounding); any one B scaled by 1.01
    reads 1.1e-4 to 1e-2); lorakern's with its adapters disabled against the frozen model's (1e-6 of the output); and
    that the adapters change the output at all (above 1e-3 of it)."""
    with torch.no_grad():
        y_frozen, y_ours, y_peft = (m(input_ids=ids).last_hidden_state for m in (frozen, ours, peft))
        with lorakern.disable_adapters(ours):
            y_off = ours(input_ids=ids).last_hidden_state
    scale, change = float(y_frozen.abs().max()), float((y_ours - y_frozen).abs().max())
    rows = [("PEFT's output = lorakern's", float((y_peft - y_ours).abs().max()) / change, 1e-4),
            ("adapters disabled = frozen model", float((y_off - y_frozen).abs().max()) / scale, 1e-6)]
    out = [{"check": name, "worst_rel_error": worst, "bound": limit, "ok": worst <= limit}
           for name, worst, limit in rows]
    out.append({"check": "the adapters change the output", "worst_rel_error": change / scale, "bound": 1e-3,
                "ok": change / scale > 1e-3})
    return out


def _lora_params(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]


def timing(frozen, ours, peft, ids, rounds: int) -> list[dict]:
    def infer(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run

    def train(model):
        params = _lora_params(model)

        def run():
            torch.autograd.grad(model(input_ids=ids).last_hidden_state.sum(), params)
        return run

    rows = []
    calls = 20 if ids.numel() <= 64 else 5
    samples = bench.interleaved({"frozen": infer(frozen), "lorakern": infer(ours), "peft": infer(peft)}, rounds,
                                "cpu", calls)
    for name, label in (("lorakern", "lorakern"), ("peft", "PEFT")):
        rows.append(_row(f"inference, {label}", "frozen model", samples[name], samples["frozen"]))
    rows.append(_row("inference, lorakern", "PEFT", samples["lorakern"], samples["peft"]))
    samples = bench.interleaved({"lorakern": train(ours), "peft": train(peft)}, rounds, "cpu", max(1, calls // 4))
    rows.append(_row("training step (to the LoRA parameters), lorakern", "PEFT", samples["lorakern"],
                     samples["peft"]))
    return rows


def _row(benchmark: str, reference: str, ours: list[float], theirs: list[float]) -> dict:
    """Min ms of each side, and the paired ratio (median of the per-round ratios) as ``ratio``."""
    return {"benchmark": benchmark, "reference": reference, "lorakern_ms": min(ours), "reference_ms": min(theirs),
            "ratio": statistics.median(a / b for a, b in zip(ours, theirs))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="tokens per row")
    parser.add_argument("--rows", type=int, default=1, help="rows per call")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="a 1-layer, 64-wide model, 2 rounds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in ("tokens", "rows", "layers", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: give a number >= 1")
    layers, hidden, heads, rounds = args.layers, 768, 12, args.rounds
    if args.quick:
        layers, hidden, heads, rounds = 1, 64, 4, 2
    frozen, ours, peft = build(layers, hidden, heads)
    ids = torch.randint(3, 1000, (args.rows, args.tokens), generator=torch.Generator().manual_seed(1))
    checks = check(frozen, ours, peft, ids)
    times = timing(frozen, ours, peft, ids, rounds)
    shape = (f"float32, RoBERTa {layers} layers x {hidden}, q and v at r=8, {args.rows} row(s) x {args.tokens} "
             f"tokens, cpu, {torch.get_num_threads()} threads; ratio: paired median")
    return bench.finish_checked("Small batches", "small_batch", shape, checks, times, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
