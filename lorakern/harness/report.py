"""What a run leaves behind besides the adapter: the markdown report and the learning-curve plot."""
from __future__ import annotations

import io
import math
import os
from typing import Optional

from lorakern._io import atomic_write_bytes

# shared/seed.md, "Published results of that setup" (validation, last epoch, one run), keyed as our metrics.
SEED_PUBLISHED: dict[str, dict[str, float]] = {
    "glue-cola": {"dev/mcc": 0.568},
    "glue-sst2": {"dev/accuracy": 0.938},
    "glue-mrpc": {"dev/accuracy": 0.885, "dev/f1": 0.917},
    "glue-stsb": {"dev/pearson": 0.808, "dev/spearman": 0.817},
    "glue-qqp": {"dev/accuracy": 0.889, "dev/f1": 0.853},
    "glue-mnli": {"dev_matched/accuracy": 0.854, "dev_mismatched/accuracy": 0.859},
    "glue-qnli": {"dev/accuracy": 0.920},
    "glue-rte": {"dev/accuracy": 0.740},
    "glue-wnli": {"dev/accuracy": 0.437},
    "squad-v1.1": {"dev/exact_match": 79.4, "dev/f1": 86.9},
    "squad-v2.0": {"dev/exact": 41.2, "dev/f1": 45.4, "dev/best_exact": 76.0, "dev/best_f1": 79.3},
}
COMPARE = ("seed",)


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if abs(value) > 1.5 else f"{value:.4f}"


def results_table(final: dict[str, float], reloaded: dict[str, float], keys: list[str],
                  published: Optional[dict[str, float]] = None) -> str:
    """| split | metric | trained | reloaded | (seed, published) | rows for ``keys``."""
    header = "| split | metric | trained | reloaded |" + (" seed (published) |" if published is not None else "")
    rule = "|---|---|---:|---:|" + ("---:|" if published is not None else "")
    rows = [header, rule]
    for key in keys:
        split, metric = key.split("/", 1)
        row = f"| {split} | {metric} | {_fmt(final.get(key))} | {_fmt(reloaded.get(key))} |"
        if published is not None:
            row += f" {_fmt(published.get(key))} |"
        rows.append(row)
    return "\n".join(rows)


def write_report(path: str, title: str, settings: dict, table: str, reload_line: str, adapter_bytes: int,
                 parameter_table: str, history: list[dict]) -> str:
    """report.md: settings, final table, reload check, per-epoch table, adapter size, trainable parameters."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "## Results (validation, last epoch)", "", table, "", reload_line, "",
              f"Adapter on disk: {adapter_bytes:,} bytes ({adapter_bytes / 1e6:.2f} MB).", "",
              "## Per epoch", "", epoch_table(history), "", "## Trainable parameters", "", parameter_table, ""]
    text = "\n".join(lines)
    atomic_write_bytes(path, text.encode("utf-8"))
    return text


def epoch_table(history: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in history for k in row))
    rows = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for row in history:
        rows.append("| " + " | ".join(str(row[c]) if c == "epoch" else _fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(rows)


def plot_curves(path: str, history: list[dict], title: str) -> None:
    """curve.png: training loss and every validation metric against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in history[0] if "/" in k]
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for key in metrics:
        values = [row.get(key, math.nan) for row in history]
        right.plot(epochs, values, marker="o", label=key)
    right.set(xlabel="epoch", title="validation")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def adapter_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
               if not name.startswith("."))
