"""The throughput and latency plots of a benchmark run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench_plan import Row


def plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """Throughput vs concurrency, and p50/p90/p99 latency at the top concurrency, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    served = [r for r in rows if r.where != "in-process"]
    models = sorted({r.model for r in served})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        series: dict[str, list[Row]] = {}
        for r in served:
            if r.model == model:
                series.setdefault(f"{r.where} {r.backend} ({r.images})", []).append(r)
        for label, points in series.items():
            ax.plot([p.concurrency for p in points], [p.rate for p in points], marker="o", label=label)
        ax.set(
            title=model,
            xlabel="concurrency",
            ylabel="req/s",
            xscale="log",
            xticks=sorted({r.concurrency for r in served}),
        )
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    top = max(r.concurrency for r in served)
    at_top = [r for r in served if r.concurrency == top]
    fig, ax = plt.subplots(figsize=(max(6, len(at_top) * 0.9), 4))
    labels = [f"{r.model}\n{r.where} {r.backend}\n{r.images}" for r in at_top]
    width = 0.27
    for k, (name, attr) in enumerate((("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))):
        ax.bar([i + (k - 1) * width for i in range(len(at_top))], [getattr(r, attr) for r in at_top], width, label=name)
    ax.set_xticks(range(len(at_top)), labels, fontsize=6)
    ax.set(ylabel="ms", title=f"latency at concurrency {top}")
    ax.legend()
    fig.tight_layout()
    written.append(out / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written
