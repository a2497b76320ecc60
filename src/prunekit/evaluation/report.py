"""Reports a person can read: Markdown tables and PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from prunekit.drop.similarity import SimilarityScores


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """`columns` = (key, header) pairs; values are printed as given (format them before)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(str(r.get(k, "-")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (never needs a display). Imported here, not at the top:
    the backend must be chosen before pyplot is first imported, and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def similarity_heatmap(scores: SimilarityScores, path: str | Path, *, title: str = "",
                       dropped: Sequence[tuple[int, str]] = ()) -> Path:
    """Per-layer similarity of block, attention and MLP: a heatmap (rows = module kind, columns = layers)
    above the same three curves; `dropped` (layer, module) pairs are marked with an x."""
    import numpy as np

    plt = pyplot()
    data = np.array([scores.block, scores.attn, scores.mlp])
    kinds = ["block", "attn", "mlp"]
    L = scores.num_layers
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(max(8, L * 0.35), 6.5), gridspec_kw={"height_ratios": [1, 1.4]})
    # Most modules score above 0.9; a colour scale from 0 would paint them all the same. Start it at the
    # 10th percentile (lower values are clipped to the darkest colour) so that differences stay visible.
    vmin = float(np.percentile(data, 10))
    im = ax0.imshow(data, aspect="auto", cmap="viridis", vmin=min(vmin, 0.999), vmax=1.0)
    ax0.set_yticks(range(3), kinds)
    ax0.set_xticks(range(L))
    ax0.tick_params(axis="x", labelsize=7)
    for layer, module in dropped:
        rows = [1, 2] if module == "block" else [kinds.index(module)]
        for r in rows:
            ax0.text(layer, r, "x", ha="center", va="center", color="red", fontsize=10, fontweight="bold")
    fig.colorbar(im, ax=ax0, label="cos(before, after)", extend="min")
    ax0.set_title(title or "LLM-Drop redundancy per layer (higher = more redundant)")
    for row, kind in zip(data, kinds):
        ax1.plot(range(L), row, marker="o", markersize=3, label=kind)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("mean cosine similarity")
    ax1.grid(alpha=0.3)
    ax1.legend()
    return save_figure(fig, path)
