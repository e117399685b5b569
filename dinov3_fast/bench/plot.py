"""Bar chart of a bench run: per (op, preset), each implementation's speed-up over the baseline."""
from __future__ import annotations

from pathlib import Path

from dinov3_fast.bench.runner import BenchRow


def speedup_label(rows: list[BenchRow]) -> str:
    """The y-axis label: which pass the speed-ups compare (forward+backward where a case has a
    backward, the forward where it has none, as BenchRow.speedup)."""
    passes = {r.fwd_bwd_ms is not None for r in rows}
    which = "fwd+bwd" if passes == {True} else "fwd" if passes == {False} else "fwd+bwd; fwd if no bwd"
    return f"speed-up over baseline ({which})"


def plot_rows(rows: list[BenchRow], path: str | Path, title: str = "dinov3-fast bench") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[BenchRow]] = {}
    for r in rows:
        groups.setdefault(f"{r.op}\n{r.preset}", []).append(r)
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for g, (_, grp) in enumerate(groups.items()):
            for r in grp:
                if r.impl == impl:
                    xs.append(g + i * width)
                    ys.append(r.speedup)
        ax.bar(xs, ys, width=width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), fontsize=7)
    ax.set_ylabel(speedup_label(rows))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
