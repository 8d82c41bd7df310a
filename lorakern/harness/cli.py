"""Flags of ``lorakern glue`` and ``lorakern squad``, and the code that turns them into a run."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from lorakern.config import ALIASES, LoraConfig

LORA_PREFIX = "lora_"


def _lora_parser(name: str, type_text: str) -> Callable[[str], Any]:
    """An argparse type for LoraConfig field ``name`` whose annotation reads ``type_text``.

    Lists are comma-separated; a target that is a regex is written ``re:PATTERN``; dicts are ``key=value,...``;
    ``none`` clears an optional field.
    """
    kind = type_text.replace(" ", "")

    def parse(text: str) -> Any:
        try:
            if text.lower() == "none" and ("Optional" in kind or "None" in kind):
                return None
            if kind.startswith("dict["):
                cast = int if kind.endswith("int]") else float
                pairs = [item.split("=", 1) for item in text.split(",") if item]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("expected key=value pairs separated by commas, e.g. value=4,query=8")
                return {k: cast(v) for k, v in pairs}
            if kind == "Union[bool,str]":  # init_lora_weights: true / false / a name
                return {"true": True, "false": False}.get(text.lower(), text)
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                return text.lower() in ("true", "1", "yes")
            if kind == "int":
                return int(text)
            if "float" in kind:
                return float(text)
            if "list[str]" in kind:
                if "str" in kind.replace("list[str]", ""):  # the field also takes a regex string
                    if text.startswith("re:"):
                        return text[3:]
                    if text.lower() == "all-linear":
                        return "all-linear"
                return [item for item in text.split(",") if item]
            return text
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--{(LORA_PREFIX + name).replace('_', '-')} {text!r}: {exc}") from None
    parse.__name__ = name
    return parse


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by glue and squad: model, data, recipe, every LoraConfig field, training, outputs."""
    from lorakern.harness.models import HEADS, RECIPES
    from lorakern.harness.report import COMPARE
    from lorakern.harness.train import PRECISIONS, TrainConfig

    defaults = TrainConfig()
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default="tiny", help="local Hugging Face folder or cached id of a BERT-family "
                       "encoder (e.g. path/to/roberta-base); default tiny: a small RoBERTa built from a config")
    group.add_argument("--data", default=None, help="folder of the official files, or 'hf' for Hugging Face "
                       "datasets in the local cache; default: the fixtures shipped with lorakern")
    group.add_argument("--skip-bad-rows", action="store_true", help="drop malformed TSV rows instead of failing")
    group.add_argument("--max-length", type=int, default=None, help="tokens per input (default: 128 tiny, 512 GLUE, "
                       "384 SQuAD, 512 SQuAD seed mode)")
    group = parser.add_argument_group("LoRA")
    group.add_argument("--recipe", default="seed", choices=RECIPES, help="seed: r=8 on query/value, biases, "
                       "LayerNorms and the head trainable (the blog's setup); qlora: NF4 base, LoRA on all linear layers")
    group.add_argument("--head", default="seed", choices=HEADS, help="seed: the blog's heads; hf: transformers' standard heads")
    short = {new: old for old, new in ALIASES.items()}  # --lora-alpha, --lora-dropout, --lora-init
    for f in dataclasses.fields(LoraConfig):
        type_text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        flag = short.get(f.name, f.name)
        group.add_argument(f"--{(LORA_PREFIX + flag).replace('_', '-')}", dest=LORA_PREFIX + f.name,
                           type=_lora_parser(flag, type_text), default=argparse.SUPPRESS,
                           help=f"LoraConfig.{f.name} ({type_text}); overrides the recipe")
    group = parser.add_argument_group("training (defaults: the seed's)")
    group.add_argument("--lr", type=float, default=None, help="peak learning rate (default 4e-5 as in the seed's "
                       "code; the post says 5e-4; 5e-3 for tiny)")
    group.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs)
    group.add_argument("--decay-epochs", type=int, default=defaults.decay_epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimiser step")
    group.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--loraplus-lr-ratio", type=float, default=None, help="LoRA+: B's learning rate is lr times "
                       "this (e.g. 16); default off (one AdamW group)")
    group.add_argument("--adam-betas", type=float, nargs=2, default=list(defaults.betas))
    group.add_argument("--adam-eps", type=float, default=defaults.eps)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: fp16 autocast on CUDA, fp32 on CPU")
    group.add_argument("--device", default="auto")
    group = parser.add_argument_group("outputs")
    group.add_argument("--out", default=None, help="run folder (default runs/<task>-<time>)")
    group.add_argument("--resume", default=None, help="a checkpoint file or run folder to continue from")
    group.add_argument("--compare", default=None, choices=COMPARE, help="add the seed's published numbers")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


HARNESS_PACKAGES = ("transformers", "tokenizers", "sklearn", "scipy", "matplotlib", "tqdm")


def require_harness_packages() -> None:
    """ImportError naming the extra (lorakern[harness]) when a package the harness needs is missing."""
    from lorakern.errors import require

    for module in HARNESS_PACKAGES:
        require(module, "harness", "lorakern glue / lorakern squad")


def run_options(args: argparse.Namespace):
    from lorakern.harness.run import RunOptions
    from lorakern.harness.train import TrainConfig

    lora = {k[len(LORA_PREFIX):]: v for k, v in vars(args).items() if k.startswith(LORA_PREFIX)}  # given flags only
    train = TrainConfig(warmup_epochs=args.warmup_epochs, decay_epochs=args.decay_epochs, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, eval_batch_size=args.eval_batch_size,
                        weight_decay=args.weight_decay, betas=tuple(args.adam_betas), eps=args.adam_eps,
                        seed=args.seed, precision=args.precision, device=args.device, progress=not args.no_progress,
                        loraplus_lr_ratio=args.loraplus_lr_ratio)
    return RunOptions(model=args.model, data=args.data, out=args.out, recipe=args.recipe, head=args.head, lora=lora,
                      train=train, lr=args.lr, max_length=args.max_length, compare=args.compare, resume=args.resume,
                      skip_bad_rows=args.skip_bad_rows)


def _print_summary(summary: dict) -> bool:
    if summary.get("rank", 0) != 0:  # under torchrun rank 0 prints (and writes) for all
        return summary["reload_agrees"]
    print(f"\n{summary['task']}: {summary['out']}")
    print(summary["table"])
    print(f"reload check: {'same metrics' if summary['reload_agrees'] else 'DIFFERENT metrics'}; "
          f"trainable {summary['trainable_parameters']:,} of {summary['total_parameters']:,}; "
          f"adapter {summary['adapter_bytes']:,} bytes")
    print("wrote report.md, metrics.json, metrics.csv, curve.png, adapter/, checkpoints/")
    return summary["reload_agrees"]


def _glue_tasks(text: str) -> list[str]:
    """--task: one GLUE task, "all", or (with --mixed) several, comma-separated."""
    from lorakern.harness.data import GLUE_TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in GLUE_TASKS and t != "all"]
    if unknown or not tasks or ("all" in tasks and len(tasks) > 1):
        raise argparse.ArgumentTypeError(f"--task {text!r}: choose from {', '.join([*GLUE_TASKS, 'all'])} "
                                         f"(several, comma-separated, with --mixed)")
    return tasks


def run_glue_command(args: argparse.Namespace) -> int:
    from lorakern.harness.glue import run_glue

    tasks = args.task
    if args.mixed:
        from lorakern.harness.mixed import run_glue_mixed

        result = run_glue_mixed(tasks, run_options(args))
        agree = all(s["reload_agrees"] for s in result["tasks"].values())
        if result.get("rank", 0) != 0:  # under torchrun rank 0 prints (and writes) for all
            return 0 if agree else 1
        for summary in result["tasks"].values():
            print(f"\n{summary['task']} (mixed): {result['out']}")
            print(summary["table"])
        print(f"\nwrote {result['out']}/adapter/<task>/ (one PEFT multi-adapter folder), metrics.json, checkpoints/")
        return 0 if agree else 1
    if len(tasks) > 1:
        raise ValueError(f"--task {','.join(tasks)}: several tasks train together with --mixed; without it give one "
                         f"task (or all)")
    args.task = tasks[0]
    result = run_glue(args.task, run_options(args))
    summaries = result.values() if args.task == "all" else [result]
    return 0 if all([_print_summary(s) for s in summaries]) else 1


def run_squad_command(args: argparse.Namespace) -> int:
    from lorakern.harness.squad import SquadOptions, run_squad

    squad = SquadOptions(mode=args.mode, doc_stride=args.doc_stride, n_best=args.n_best,
                         max_answer_length=args.max_answer_length, null_threshold=args.null_threshold)
    return 0 if _print_summary(run_squad(args.version, run_options(args), squad)) else 1


def add_commands(sub) -> None:
    """Register ``glue`` and ``squad`` on the ``lorakern`` command's subparsers."""
    from lorakern.harness.data import GLUE_TASKS

    glue = sub.add_parser("glue", help="fine-tune with LoRA on a GLUE task and report its metrics")
    glue.add_argument("--task", required=True, type=_glue_tasks, metavar="|".join([*GLUE_TASKS, "all"]),
                      help="a GLUE task, or all; with --mixed several, comma-separated (sst2,mrpc,rte)")
    glue.add_argument("--mixed", action="store_true", help="train the tasks at once: one adapter and head per task, "
                      "batches mixed across tasks (lorakern.adapter_rows)")
    add_run_flags(glue)
    glue.set_defaults(handler=run_glue_command)
    squad = sub.add_parser("squad", help="fine-tune with LoRA on SQuAD v1.1 or v2.0")
    squad.add_argument("--version", default="1.1", choices=["1.1", "2.0"])
    squad.add_argument("--mode", default="sliding", choices=["sliding", "seed"],
                       help="sliding: doc-stride windows, n-best, max answer length; seed: truncate, argmax")
    squad.add_argument("--doc-stride", type=int, default=None, help="overlap of windows (default max_length // 3)")
    squad.add_argument("--n-best", type=int, default=20)
    squad.add_argument("--max-answer-length", type=int, default=30, help="in tokens")
    squad.add_argument("--null-threshold", type=float, default=None,
                       help="v2.0: answer '' above this no-answer probability (default 0.5; seed mode 1.0)")
    add_run_flags(squad)
    squad.set_defaults(handler=run_squad_command)


def main_error(exc: Exception) -> int:
    print(f"lorakern: error: {exc}", file=sys.stderr)
    return 2
