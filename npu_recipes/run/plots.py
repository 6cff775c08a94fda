"""``loss.png``: training and evaluation loss against optimizer step, drawn from logging.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from npu_recipes import atomic


def draw_loss(records: List[Dict[str, Any]], target: Path, title: str) -> None:
    """Plot ``loss`` (train records) and ``eval_loss`` (eval records) against ``step`` into ``target`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and "loss" in r]
    evaluation = [(r["step"], r["eval_loss"]) for r in records if r.get("type") == "eval"]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (token-averaged cross-entropy)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic.write_with(target, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
