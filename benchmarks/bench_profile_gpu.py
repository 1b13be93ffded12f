"""Speed of R-MeeTo's training-free merged Vision Mambas against the unmerged model, on one GPU.

For each model (random weights) × recipe (none = the baseline, r014 … r056) × batch size × mode
(eager, whole forward in one CUDA graph): images/s, median ms per batch, speed-up vs ``none``
(same mode and batch, same run), merge overhead (``sliced`` method: the same model with each
merge replaced by keeping the first tokens — see compressor/profile/overhead.py) and the
speed-up a free merge would give. Before timing, each merged model's graph replay is checked
against eager on a fresh input. Prints one table and writes every number to a JSON file.

GPU (kernels on PYTHONPATH: benchmarks/gpu_env.sh, fp16)::

    python benchmarks/bench_profile_gpu.py --out benchmarks/results/profile_gpu_h100.json

CPU smoke run::

    python benchmarks/bench_profile_gpu.py --device cpu --models vim_test --batch-sizes 2 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import ops  # noqa: E402
from compressor._io import atomic_write_text  # noqa: E402
from compressor.inference import GraphedModel  # noqa: E402
from compressor.merge import set_merge_impl  # noqa: E402
from compressor.models import set_backend  # noqa: E402
from compressor.profile import ProfileSettings, load_targets, profile_models  # noqa: E402
from compressor.profile.run import DTYPES  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="vim_tiny,vim_small,vim_base")
    p.add_argument("--recipes", default="none,r014,r031,r042,r056")
    p.add_argument("--batch-sizes", default="128,1")
    p.add_argument("--dtype", default=None, help="fp16 on cuda, fp32 on cpu by default")
    p.add_argument("--backends", default="eager,graph")
    p.add_argument("--ops", default="auto", help="op backend: auto = mamba-ssm/causal-conv1d kernels when present")
    p.add_argument("--merge-impl", default="auto", help="auto (Triton merge on CUDA), torch (reference), triton")
    p.add_argument("--warmup", type=int, default=None, help="5 on cuda, 1 on cpu by default")
    p.add_argument("--repeats", type=int, default=None, help="30 on cuda, 3 on cpu by default")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/profile_gpu_<card>.json)")
    return p.parse_args(argv)


def graph_matches_eager(model, x: torch.Tensor) -> float | None:
    """Max |graph replay - eager| / max |eager| on a fresh input through the captured graph."""
    if x.device.type != "cuda":
        return None
    graphed = GraphedModel(model)
    graphed(x)  # captures
    fresh = torch.randn_like(x)
    got = graphed(fresh)
    with torch.inference_mode():
        ref = model(fresh)
    graphed.reset()
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def _rows(report: dict) -> list[dict]:
    out = []
    for e in report["models"]:
        sliced = {(r["backend"], r["batch_size"]): r for r in e["merge_overhead"] if r["method"] == "sliced"}
        for r in e["timings"]:
            o = sliced.get((r["backend"], r["batch_size"]), {})
            out.append({
                "model": report["model_name"], "merge_impl": report["settings"]["merge_impl_used"], "recipe": e["recipe"], "batch": r["batch_size"], "mode": r["backend"],
                "status": r["status"], "images_per_s": r["throughput"], "ms": r["latency_ms_median"],
                "speedup": r["speedup"], "merge_overhead": o.get("overhead_fraction"),
                "sliced_speedup": o.get("sliced_speedup"), "gflops": e["flops"]["gflops"],
                "tokens_last": e["tokens_per_layer"][-1],
            })
    return out


def _fmt(v, spec, prefix=""):
    return "-" if v is None else prefix + format(v, spec)


def _table(rows: list[dict], title: str) -> Table:
    """Rows that ran (a skipped mode, e.g. graph on the CPU, is said once below the table)."""
    t = Table(title=title)
    for h in ("model", "bs", "mode", "recipe", "im/s", "ms", "vs none", "merge", "ideal"):
        t.add_column(h, justify="left" if h in ("model", "mode", "recipe") else "right", no_wrap=True)
    for r in sorted((r for r in rows if r["images_per_s"]), key=lambda r: (r["model"], -r["batch"], r["mode"])):
        t.add_row(r["model"], str(r["batch"]), r["mode"] + ("" if r["status"] == "ok" else f" ({r['status']})"), r["recipe"],
                  _fmt(r["images_per_s"], ".1f"), _fmt(r["ms"], ".2f"), _fmt(r["speedup"], ".2f", "x"),
                  _fmt(r["merge_overhead"] and 100 * r["merge_overhead"], ".1f") + ("%" if r["merge_overhead"] is not None else ""),
                  _fmt(r["sliced_speedup"], ".2f", "x"))
    return t


def main(argv=None) -> int:
    a = _args(argv)
    cuda = a.device == "cuda"
    settings = ProfileSettings(
        device=a.device, batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")), dtype=a.dtype,
        backends=tuple(a.backends.split(",")), warmup=a.warmup if a.warmup is not None else (5 if cuda else 1),
        repeats=a.repeats if a.repeats is not None else (30 if cuda else 3), ops=a.ops, overhead=("sliced",),
        merge_impl=a.merge_impl,
    ).resolved()
    recipes = [r for r in a.recipes.split(",") if r != "none"]
    console = Console()
    reports, rows, checks = [], [], {}
    t0 = time.perf_counter()
    out = None
    for name in a.models.split(","):
        targets = load_targets(model=name, recipes=recipes)
        for t in targets[1:]:  # correct first: the graph replay must compute what eager computes
            m = set_backend(t.module.eval(), settings.ops).to(device=settings.device, dtype=DTYPES[settings.dtype])
            set_merge_impl(m, settings.merge_impl)
            x = torch.randn(2, m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size, device=settings.device, dtype=DTYPES[settings.dtype])
            checks[f"{name}/{t.name}"] = graph_matches_eager(m, x)
            m.to("cpu")
        console.print(f"[dim]{name}: {len(targets)} models …[/dim]")
        report = profile_models(targets, settings) | {"model_name": name}
        reports.append(report)
        rows += _rows(report)
        out = _write(a.out, reports, rows, checks, time.perf_counter() - t0)  # after each model: a timeout keeps the rest
    hw = reports[0]["hardware"]
    st = reports[0]["settings"]
    console.print(_table(rows, f"{hw['device_name']} · {settings.dtype} · ops {st['op_backend']} · merges {st['merge_impl_used']}"))
    console.print("ms = median per batch; merge = (t_merged - t_sliced) / t_merged; ideal = speed-up vs none "
                  "with every merge replaced by zero-cost slicing", highlight=False)
    for note in {n for r in reports for n in r["notes"]}:
        console.print(f"note: {note}", highlight=False)
    measured = [v for v in checks.values() if v is not None]
    bad = {k: v for k, v in checks.items() if v is not None and v > 1e-2}
    console.print((f"graph replay vs eager, max rel diff: worst {max(measured):.1e}" if measured else
                   "graph replay vs eager: not checked (no CUDA)") + (f"; MISMATCH {bad}" if bad else ""), highlight=False)
    console.print(f"wrote {out}")
    return 1 if bad else 0


def _write(path, reports, rows, checks, wall_s) -> Path:
    hw = reports[0]["hardware"]
    slug = re.sub(r"[^a-z0-9]+", "_", hw["device_name"].lower()).strip("_")
    out = Path(path or Path(__file__).parent / "results" / f"profile_gpu_{slug}.json")
    payload = {"hardware": hw, "settings": reports[0]["settings"], "kernels": ops.kernels_available(),
               "graph_vs_eager_rel_diff": checks, "rows": rows, "reports": reports, "wall_s": wall_s,
               "command": " ".join(sys.argv)}
    atomic_write_text(out, json.dumps(payload, indent=1, default=str) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
