"""The Pareto table and plot `compress` writes next to its checkpoint: every candidate tried, quality (held-out
calibration perplexity) against what it removed, the chosen one marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARETO_JSON = "pareto.json"
PARETO_PNG = "pareto.png"


def pareto_rows(candidates: list[dict[str, Any]], chosen: str) -> list[dict[str, Any]]:
    """Candidates sorted by what they removed, each flagged `chosen` and `pareto` (no other candidate removes
    at least as much with a lower loss)."""
    rows = [dict(c, chosen=c["name"] == chosen) for c in candidates]
    for r in rows:
        r["pareto"] = not any(o is not r and o["removed_params"] >= r["removed_params"]
                              and o["check_loss"] < r["check_loss"] for o in rows)
    return sorted(rows, key=lambda r: (r["removed_params"], r["check_loss"]))


def write_pareto(result: Any, folder: Path) -> None:
    """`pareto.json` (budget, chosen, rows) and `pareto.png` into `folder`."""
    rows = pareto_rows(result.candidates, result.chosen)
    (folder / PARETO_JSON).write_text(json.dumps(
        {"budget": result.plan.options.get("budget"), "chosen": result.chosen, "candidates": rows}, indent=2) + "\n")
    plot_pareto(rows, folder / PARETO_PNG, title=f"prunekit compress {result.plan.options.get('budget')}")


def plot_pareto(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        marker = "*" if r["chosen"] else ("o" if r["at_budget"] else "s")
        ax.scatter(100 * r["removed_params"], r["check_ppl"], marker=marker, s=160 if r["chosen"] else 36,
                   color="tab:red" if r["chosen"] else ("tab:blue" if r["pareto"] else "tab:gray"), zorder=3)
        ax.annotate(r["name"], (100 * r["removed_params"], r["check_ppl"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("held-out calibration perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
