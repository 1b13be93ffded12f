"""PNG plots of a profile report: throughput vs batch size, tokens per layer, accuracy vs
throughput. Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no GUI backend)
and written atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .._io import atomic_write

__all__ = ["plot_throughput", "plot_tokens", "plot_accuracy", "write_plots"]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def _style(entry: dict, baseline: str) -> dict:
    return {"color": "black", "linestyle": "--"} if entry["name"] == baseline else {}


def plot_throughput(report: dict, path: Path) -> Path | None:
    """Images/s against batch size, one panel per backend that produced numbers."""
    backends = [b for b in report["settings"]["backends"]
                if any(r["backend"] == b and r["throughput"] for e in report["models"] for r in e["timings"])]
    if not backends:
        return None
    fig = Figure(figsize=(5.2 * len(backends), 4))
    for i, backend in enumerate(backends):
        ax = fig.add_subplot(1, len(backends), i + 1)
        for e in report["models"]:
            rows = sorted((r["batch_size"], r["throughput"]) for r in e["timings"] if r["backend"] == backend and r["throughput"])
            if rows:
                ax.plot(*zip(*rows), marker="o", label=e["name"], **_style(e, report["baseline"]))
        ax.set_xscale("log", base=2)
        sizes = report["settings"]["batch_sizes"]
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"{backend} ({report['hardware']['device_name']}, {report['settings']['dtype']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


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
