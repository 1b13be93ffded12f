"""PNG plots of a profile report: throughput vs batch size (from zero, with the timing spread as
error bars), tokens per layer, accuracy vs throughput. Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no GUI backend)
and written atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .._io import atomic_write

__all__ = ["throughput_figure", "plot_throughput", "plot_tokens", "plot_accuracy", "write_plots"]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def _style(entry: dict, baseline: str) -> dict:
    return {"color": "black", "linestyle": "--"} if entry["name"] == baseline else {}


def _throughput_points(e: dict, backend: str) -> list[tuple[int, float, float, float]]:
    """``(batch, images/s at the median, at q3 (slow), at q1 (fast))`` of a model's timings."""
    pts = []
    for r in e["timings"]:
        if r["backend"] == backend and r["throughput"]:
            bs, q1, q3 = r["batch_size"], r.get("latency_ms_q1"), r.get("latency_ms_q3")
            lo = bs / (q3 / 1e3) if q3 else r["throughput"]
            hi = bs / (q1 / 1e3) if q1 else r["throughput"]
            pts.append((bs, r["throughput"], lo, hi))
    return sorted(pts)


def plot_throughput(report: dict, path: Path) -> Path | None:
    """Write :func:`throughput_figure` to ``path`` (None when no backend produced numbers)."""
    fig = throughput_figure(report)
    return None if fig is None else _save(fig, path)


def throughput_figure(report: dict) -> Figure | None:
    """Throughput (images/s) against batch size, one panel per backend that produced numbers,
    y from zero; error bars span the images/s of the middle half of the timed calls (the IQR of
    latency)."""
    backends = [b for b in report["settings"]["backends"]
                if any(r["backend"] == b and r["throughput"] for e in report["models"] for r in e["timings"])]
    if not backends:
        return None
    st, hw = report["settings"], report["hardware"]
    fig = Figure(figsize=(5.2 * len(backends), 4.2))
    for i, backend in enumerate(backends):
        ax = fig.add_subplot(1, len(backends), i + 1)
        models = report["models"]
        for j, e in enumerate(models):
            pts = _throughput_points(e, backend)
            if pts:
                bs, mid, lo, hi = (list(c) for c in zip(*pts))
                dodge = 2 ** (0.06 * (j - (len(models) - 1) / 2))  # side by side, so error bars do not hide each other
                bs = [b * dodge for b in bs]
                err = [[m - a for m, a in zip(mid, lo)], [b - m for m, b in zip(mid, hi)]]
                ax.errorbar(bs, mid, yerr=err, marker="o", capsize=3, label=e["name"], **_style(e, report["baseline"]))
        ax.set_xscale("log", base=2)
        sizes = st["batch_sizes"]
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (images / s)")
        ax.set_title(f"throughput, {backend}: {hw['device_name']}, {st['dtype']}\n"
                     "bars: middle half of the timed calls", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_tokens(report: dict, path: Path) -> Path:
    """Tokens each layer processes, per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for e in report["models"]:
        tokens = e["tokens_per_layer"]
        ax.step(range(len(tokens)), tokens, where="post", label=e["name"], **_style(e, report["baseline"]))
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens")
    ax.set_title("tokens per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _speed_point(e: dict, backend: str) -> float | None:
    rows = [r for r in e["timings"] if r["backend"] == backend and r["throughput"]]
    return max(rows, key=lambda r: r["batch_size"])["throughput"] if rows else None


def plot_accuracy(report: dict, path: Path) -> Path | None:
    """Top-1 against throughput at the largest batch size of the first backend with numbers."""
    models = [e for e in report["models"] if e["accuracy"]]
    for backend in report["settings"]["backends"]:
        points = [(e, _speed_point(e, backend)) for e in models]
        points = [(e, t) for e, t in points if t]
        if points:
            break
    else:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for e, t in points:
        ax.scatter([t], [e["accuracy"]["top1"]], **({"color": "black", "marker": "s"} if e["name"] == report["baseline"] else {}))
        ax.annotate(e["name"], (t, e["accuracy"]["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    bs = max(report["settings"]["batch_sizes"])
    ax.set_xlabel(f"images / s ({backend}, largest batch {bs})")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy vs throughput")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """Write the plots that apply; returns ``{kind: path}``."""
    out = {
        "throughput": plot_throughput(report, out_dir / "throughput.png"),
        "tokens": plot_tokens(report, out_dir / "tokens_per_layer.png"),
        "accuracy": plot_accuracy(report, out_dir / "accuracy.png") if any(e["accuracy"] for e in report["models"]) else None,
    }
    return {k: str(v) for k, v in out.items() if v is not None}
