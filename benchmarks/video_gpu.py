"""VideoMamba video models on one GPU: speed of the merged models against the plain one at 8 frames
of 224 px (1 + 8·196 = 1569 tokens), after checking that the fast paths compute what they should.

1. The Triton merge (``compressor.merge.fast``) against the reference merge at 1569 tokens, through
   a whole merge schedule (sizes from the earlier merges), fp32 and fp16, widths of Ti / S / M; and
   at its limits (``MAX_TOKENS``: the longest sequence it runs, one more is refused and ``auto``
   falls back to the reference).
2. Each merged model's CUDA-graph replay with the Triton merge (``compressor.optimize_for_inference``)
   against eager with the reference merge, on a fresh clip.
3. The largest batch that fits: the plain model's eager forward at batch 1, 2, 4, ... until it runs
   out of memory or reaches ``--max-batch``.
4. Timing (``compressor.profile``, plain re-measured in the same run): batch 1 eager and one CUDA
   graph, the largest batch eager (GPU-bound: a graph adds nothing there); speed-up vs plain, merge
   overhead and the zero-cost-slicing bound (each merge replaced by keeping the first tokens; see
   ``compressor/profile/overhead.py``).

Prints a table and writes every number to ``benchmarks/results/video_gpu_<card>.json``.

GPU (fp16, mamba-ssm / causal-conv1d kernels on PYTHONPATH, see benchmarks/video_gpu.sh)::

    python benchmarks/video_gpu.py                 # --ops triton: the project's own mixer kernels instead

CPU smoke run (tiny model, the reference merge)::

    python benchmarks/video_gpu.py --device cpu --models videomamba_video_test --recipes smoke --max-batch 4
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import ops, optimize_for_inference  # noqa: E402
from compressor._io import atomic_write_text  # noqa: E402
from compressor.merge import TokenMerge, fast, merge_schedule, set_merge_impl  # noqa: E402
from compressor.models import get_config, set_backend  # noqa: E402
from compressor.profile import ProfileSettings, load_targets, profile_models  # noqa: E402
from compressor.profile.run import DTYPES  # noqa: E402

#: 8 frames x 196 patches + the class token (the paper's Kinetics-400 setting)
VIDEO_TOKENS = 1569


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="videomamba_video_tiny,videomamba_video_small")
    p.add_argument("--recipes", default="video-r031,paper-videomamba-video-ti",
                   help="merged variants (video-r031 = merge 88 = the paper's VideoMamba-S/M preset)")
    p.add_argument("--dtype", default=None, help="fp16 on cuda, fp32 on cpu by default")
    p.add_argument("--ops", default=None, help="op backend: cuda (mamba-ssm / causal-conv1d kernels) on cuda by default, "
                   "auto on cpu; triton = the project's own mixer kernels")
    p.add_argument("--merge-impl", default=None, help="triton on cuda (the fast merge), torch on cpu by default")
    p.add_argument("--max-batch", type=int, default=256, help="stop the batch search here (time budget)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls: 30 at batch 1 on cuda (3 on cpu)")
    p.add_argument("--big-repeats", type=int, default=6, help="timed calls at the largest batch")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/video_gpu_<card>.json)")
    return p.parse_args(argv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not b.numel():
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------------------------
# 1. the Triton merge at video lengths


def _reference(step, hidden, residual, size):
    from compressor.merge import MergeConfig

    m = TokenMerge(step, MergeConfig(num_prune=step.r))
    m.impl = "torch"
    return m(hidden, residual, size)


def check_merge_schedule(device: str, tokens: int, width: int, num_prune: int, dtype: torch.dtype, depth: int = 24) -> dict:
    """Every merge of a schedule from ``tokens``: the Triton merge and the reference on the same
    random inputs (hidden in ``dtype``, residual fp32, sizes from the previous merge).

    ``differing``: output tokens whose size differs (another assignment). Both implementations
    score in fp32 but sum the dot products in another order, so a near-tie between two sources'
    best scores at the cut (gaps of ~1e-4 between 785 scores, rounding ~1e-7) can flip one
    source; a bug moves many. ``hidden_rel`` / ``residual_rel``: over the tokens that agree."""
    from compressor.merge import MergeConfig

    g = torch.Generator(device=device).manual_seed(tokens + width + num_prune)
    steps = merge_schedule(MergeConfig(num_prune=num_prune), tokens, 0, depth)
    size, worst_h, worst_r, differing = None, 0.0, 0.0, 0
    for step in steps:
        h = torch.randn(2, step.tokens_in, width, device=device, generator=g).to(dtype)
        res = torch.randn(2, step.tokens_in, width, device=device, generator=g)
        got = fast.fast_merge(h, res, size, step.r, step.cls_in, step.cls_out)
        want = _reference(step, h, res, size)
        agree = (got[2] == want[2]).all(-1)  # (b, tokens_out)
        differing = max(differing, int((~agree).sum()))
        worst_h = max(worst_h, _rel(got[0][agree], want[0][agree]))
        worst_r = max(worst_r, _rel(got[1][agree], want[1][agree]))
        size = want[2]
    return {"tokens": tokens, "width": width, "num_prune": num_prune, "dtype": str(dtype).removeprefix("torch."),
            "merges": len(steps), "tokens_out": steps[-1].tokens_out if steps else tokens,
            "differing": differing, "hidden_rel": worst_h, "residual_rel": worst_r}


def check_limits(device: str, width: int = 192) -> dict:
    """``MAX_TOKENS`` runs (and equals the reference); one token more is not supported and the
    ``auto`` merge falls back to the reference instead of failing."""
    from compressor.merge import MergeConfig, MergeStep

    n = fast.MAX_TOKENS
    g = torch.Generator(device=device).manual_seed(n)
    h = torch.randn(1, n, width, device=device, generator=g, dtype=torch.float16)
    res = torch.randn(1, n, width, device=device, generator=g)
    step = MergeStep(layer=2, tokens_in=n, r=88, cls_in=0, cls_out=0)
    got, want = fast.fast_merge(h, res, None, 88, 0, 0), _reference(step, h, res, None)
    over = MergeStep(layer=2, tokens_in=n + 1, r=88, cls_in=0, cls_out=0)
    auto = TokenMerge(over, MergeConfig(num_prune=88))
    h1 = torch.randn(1, n + 1, width, device=device, generator=g, dtype=torch.float16)
    with torch.inference_mode():
        fell_back = auto(h1, h1.float())[0].shape[1] == n + 1 - 88
    agree = (got[2] == want[2]).all(-1)
    return {"max_tokens": n, "at_max_differing": int((~agree).sum()), "at_max_hidden_rel": _rel(got[0][agree], want[0][agree]),
            "supports_max": fast.supports(ordered=True, distance="cosine", tokens=n, width=width, dtype=torch.float32),
            "supports_max_plus_1": fast.supports(ordered=True, distance="cosine", tokens=n + 1, width=width, dtype=torch.float32),
            "auto_beyond_max_runs_reference": bool(fell_back)}


def merge_checks(device: str, models: list[str], console: Console) -> dict:
    cuda = device == "cuda"
    if not (fast.available() and (cuda or fast.interpreting())):
        return {"skipped": "needs Triton on CUDA (or TRITON_INTERPRET=1)"}
    widths = sorted({get_config(m).embed_dim for m in models})
    # the interpreter runs a kernel program per Python call: keep the CPU smoke run short
    tokens = VIDEO_TOKENS if cuda else get_config(models[0]).num_tokens
    rows = [check_merge_schedule(device, tokens, w, r, dt) for w in widths for r in (88, 40)
            for dt in ((torch.float32, torch.float16) if cuda else (torch.float32,))]
    out = {"schedules": rows, "limits": check_limits(device) if cuda else None}
    for r in rows:
        console.print(f"[dim]triton merge {r['tokens']} tokens, d {r['width']}, r {r['num_prune']}, {r['dtype']}: "
                      f"{r['merges']} merges -> {r['tokens_out']}, tokens assigned differently {r['differing']}, "
                      f"hidden rel {r['hidden_rel']:.1e}[/dim]", highlight=False)
    if out["limits"]:
        console.print(f"[dim]limits: {out['limits']}[/dim]", highlight=False)
    return out


# --------------------------------------------------------------------------------------------
# 2. graph replay (Triton merge) against eager (reference merge), 3. the largest batch


def graph_vs_eager(module, settings: ProfileSettings) -> float | None:
    if settings.device != "cuda":
        return None
    dtype = DTYPES[settings.dtype]
    m = set_backend(module.eval(), settings.ops).to(device="cuda", dtype=dtype)
    x = torch.randn(2, *m.layout.input_shape, device="cuda", dtype=dtype)
    try:
        set_merge_impl(m, settings.merge_impl)
        fast_model = optimize_for_inference(m)
        fast_model(x)  # captures
        fresh = torch.randn_like(x)
        got = fast_model(fresh)
        fast_model.reset()
        set_merge_impl(m, "torch")
        with torch.inference_mode():
            want = m(fresh)
    finally:
        set_merge_impl(m, "auto")
        m.to("cpu")
        torch.cuda.empty_cache()
    return _rel(got, want)


def largest_batch(module, settings: ProfileSettings, cap: int) -> dict:
    """Doubling from 1: the largest batch whose eager forward of the plain model fits."""
    dtype = DTYPES[settings.dtype]
    m = set_backend(module.eval(), settings.ops).to(device=settings.device, dtype=dtype)
    fits, tried, stopped = 0, [], "cap"
    try:
        b = 1
        while b <= cap:
            try:
                with torch.inference_mode():
                    m(torch.randn(b, *m.layout.input_shape, device=settings.device, dtype=dtype))
                fits = b
                tried.append(b)
            except torch.OutOfMemoryError:
                stopped = "out of memory"
                break
            finally:
                if settings.device == "cuda":
                    torch.cuda.empty_cache()
            b *= 2
    finally:
        m.to("cpu")
    return {"batch": fits, "tried": tried, "stopped_by": stopped, "cap": cap}


# --------------------------------------------------------------------------------------------
# 4. timing


def _rows(name: str, report: dict) -> list[dict]:
    out = []
    for e in report["models"]:
        sliced = {(r["backend"], r["batch_size"]): r for r in e["merge_overhead"] if r["method"] == "sliced"}
        for r in e["timings"]:
            o = sliced.get((r["backend"], r["batch_size"]), {})
            out.append({
                "model": name, "recipe": e["recipe"], "batch": r["batch_size"], "mode": r["backend"], "status": r["status"],
                "clips_per_s": r["throughput"], "ms": r["latency_ms_median"], "peak_mb": r["peak_memory_mb"],
                "speedup": r["speedup"], "speedup_within_noise": r.get("speedup_within_noise"),
                "merge_overhead": o.get("overhead_fraction"), "sliced_speedup": o.get("sliced_speedup"),
                "tokens_last": e["tokens_per_layer"][-1], "gflops": e["flops"]["gflops"],
            })
    return out


def _fmt(v, spec, prefix=""):
    return "-" if v is None else prefix + format(v, spec)


def _table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for h in ("model", "bs", "mode", "recipe", "tokens", "clips/s", "ms", "vs plain", "merge", "bound"):
        t.add_column(h, justify="left" if h in ("model", "mode", "recipe") else "right", no_wrap=True)
    for r in sorted((r for r in rows if r["clips_per_s"]), key=lambda r: (r["model"], r["batch"], r["mode"])):
        t.add_row(r["model"].removeprefix("videomamba_video_"), str(r["batch"]),
                  r["mode"] + ("" if r["status"] == "ok" else f" ({r['status']})"), r["recipe"], str(r["tokens_last"]),
                  _fmt(r["clips_per_s"], ".1f"), _fmt(r["ms"], ".2f"),
                  _fmt(r["speedup"], ".2f", "~x" if r["speedup_within_noise"] else "x"),
                  _fmt(r["merge_overhead"] and 100 * r["merge_overhead"], ".1f") + ("%" if r["merge_overhead"] is not None else ""),
                  _fmt(r["sliced_speedup"], ".2f", "x"))
    return t


def main(argv=None) -> int:
    a = _args(argv)
    cuda = a.device == "cuda"
    console = Console(width=None if sys.stdout.isatty() else 140)  # logs (| tee) get the whole table
    base = ProfileSettings(device=a.device, dtype=a.dtype, ops=a.ops or ("cuda" if cuda else "auto"), overhead=("sliced",),
                           merge_impl=a.merge_impl or ("triton" if cuda else "torch"),
                           warmup=5 if cuda else 1, repeats=a.repeats or (30 if cuda else 3)).resolved()
    models, recipes = a.models.split(","), [r for r in a.recipes.split(",") if r != "none"]
    t0 = time.perf_counter()
    result = {"command": " ".join(sys.argv), "merge_checks": merge_checks(a.device, models, console), "models": {},
              "rows": [], "graph_vs_eager_rel": {}}
    out = None
    for name in models:
        targets = load_targets(model=name, recipes=recipes)
        for t in targets[1:]:  # correct first
            result["graph_vs_eager_rel"][f"{name}/{t.name}"] = graph_vs_eager(t.module, base)
        big = largest_batch(targets[0].module, base, a.max_batch)
        console.print(f"[dim]{name}: {targets[0].module.layout.num_tokens} tokens, largest batch {big['batch']} "
                      f"(stopped by {big['stopped_by']})[/dim]", highlight=False)
        small = replace(base, batch_sizes=(1,), backends=("eager", "graph") if cuda else ("eager",))
        large = replace(base, batch_sizes=(big["batch"],), backends=("eager",), warmup=2 if cuda else 1,
                        repeats=a.big_repeats)
        reports = [profile_models(targets, small)]  # plain re-measured in each call
        if big["batch"] > 1:
            reports.append(profile_models(targets, large))
        result["models"][name] = {"largest_batch": big, "reports": reports}
        result["rows"] += [row for rep in reports for row in _rows(name, rep)]
        result["hardware"], result["settings"] = reports[0]["hardware"], reports[0]["settings"]
        result["wall_s"] = time.perf_counter() - t0
        out = _write(a.out, result)  # after each model: a timeout keeps what was measured
    hw, st = result["hardware"], result["settings"]
    console.print(_table(result["rows"], f"{hw['device_name']} · {st['dtype']} · ops {st['op_backend']} · "
                                         f"merges {st['merge_impl_used']}"))
    console.print("ms = median per batch; vs plain = clips/s over the plain model's (same mode and batch, this run; "
                  "~ = within the timing spread); "
                  "merge = (t_merged - t_sliced) / t_merged; bound = speed-up with every merge replaced by zero-cost "
                  "slicing", highlight=False)
    bad = _failures(result)
    console.print(f"checks: {'all passed' if not bad else 'FAILED ' + '; '.join(bad)}", highlight=False)
    console.print(f"wrote {out}")
    return 1 if bad else 0


def _failures(result: dict) -> list[str]:
    bad = [f"graph vs eager {k}: {v:.1e}" for k, v in result["graph_vs_eager_rel"].items() if v is not None and not v <= 2e-2]
    checks = result["merge_checks"]
    for r in checks.get("schedules", []):
        tol = 1e-5 if r["dtype"] == "float32" else 2e-3
        if r["differing"] > 2 or not r["hidden_rel"] <= tol or not r["residual_rel"] <= 1e-5:
            bad.append(f"triton merge {r}")
    lim = checks.get("limits")
    if lim and not (lim["at_max_differing"] <= 2 and lim["at_max_hidden_rel"] <= 2e-3 and lim["supports_max"]
                    and not lim["supports_max_plus_1"]
                    and lim["auto_beyond_max_runs_reference"]):
        bad.append(f"limits {lim}")
    return bad


def _write(path, result: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", result["hardware"]["device_name"].lower()).strip("_")
    out = Path(path or Path(__file__).parent / "results" / f"video_gpu_{slug}.json")
    payload = {**result, "kernels": ops.kernels_available()}
    atomic_write_text(out, json.dumps(payload, indent=1, default=str) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
