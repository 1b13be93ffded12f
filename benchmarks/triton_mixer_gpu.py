"""rmeeto's Triton mixer kernels against the mamba-ssm / causal-conv1d kernels, on one GPU.

Sections (``--sections``, all by default), each re-measuring the ``cuda`` baseline in the same
run, every number a median over repeats after warm-up (CUDA events; graphs: replays):

- ``tune``: the Triton scan alone at Vim-S shapes (batch 128 and 1, 197 and 136 tokens) under
  several tile configurations; the fastest per regime is applied to ``TUNING`` for the rest of
  the run (and printed, to be written into ``compressor/ops/_triton_bimamba.py``).
- ``mixer``: one mixer (``bimamba_inner`` + ``out_proj``) forward, and forward + backward, per
  backend at Vim-S width.
- ``models``: whole models (random weights, fp16) plain, r031 (merged) and r031 with the merges
  replaced by zero-cost slicing, per backend: batch 128 eager and CUDA graph, batch 1 graph.
  The triton model's logits are compared with the cuda model's first.
- ``kernels``: device time per kernel of one plain batch-1 forward (the first of ``--models``),
  per backend: where the batch-1 latency goes.
- ``timeline``: batch 1 in a CUDA graph (plain, ``--recipe``, its slicing twin; last backend):
  replay time, and a profiler trace split into kernel time and the idle gaps between kernels.
  Batch-1 graphs timed in one process are not like for like: a process's first graph replays
  faster than any graph once a second exists; ``benchmarks/b1_graph.py`` times each model in a
  process of its own.
- ``retrain``: the engine's ``train_step`` (merged student forward + backward, teacher forward,
  AdamW) at batch 128, bf16 autocast, recipes none and r031, per backend.

Prints a short table last; writes everything to ``--out`` (JSON). On the lent GPU:
``bash benchmarks/triton_mixer_gpu.sh`` (kernels from the shared tarballs, tests first).
CPU smoke run (interpreter; tiny): ``TRITON_INTERPRET=1 python benchmarks/triton_mixer_gpu.py --smoke``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import ops  # noqa: E402
from compressor.convert import convert  # noqa: E402
from compressor.inference import GraphedModel  # noqa: E402
from compressor.models import create_model, set_backend  # noqa: E402
from compressor.ops import _triton_bimamba as tb  # noqa: E402
from compressor.profile.overhead import sliced_variant  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="tune,mixer,models,retrain",
                   help="comma-separated; models=a+b limits one models section to those models")
    p.add_argument("--models", default="vim_tiny,vim_small,vim_base")
    p.add_argument("--recipe", default="r031")
    p.add_argument("--backends", default="cuda,triton", help="first = baseline")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--graph-repeats", type=int, default=30)
    p.add_argument("--retrain-steps", type=int, default=8)
    p.add_argument("--tune-batches", default="128,1", help="batch sizes the tune section times")
    p.add_argument("--tune-configs", default="16x4,32x2,32x4,64x4,128x4,32x2p,32x4p,32x2s4,32x4s4,32x2s8,32x4s8,32x4ps8",
                   help="scan tiles BDxU[p][sTS] to time: p, with prefetch (TUNING pf 1); sTS, inference cut into up to TS pieces (TUNING ts)")
    p.add_argument("--tuning", default=None, help="JSON of TUNING overrides applied before anything (skips nothing)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, vim_test, for a CPU check of the script")
    p.add_argument("--out", default="triton_mixer.json")
    return p.parse_args(argv)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call (CUDA events, or wall clock on the CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def timed_in_graph(fn, calls: int = 10, repeats: int = 20) -> list[float]:
    """Milliseconds per call of ``fn`` replayed from one CUDA graph of ``calls`` calls (no host
    launch in the number: at batch 1 an eager call's launch is larger than the kernel); eager
    :func:`timed` on the CPU."""
    if DEV != "cuda":
        return timed(fn, 1, repeats)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return [ms / calls for ms in timed(graph.replay, 3, repeats)]


def graph_ms(model, x, repeats: int) -> tuple[float, str]:
    """Median ms of one CUDA-graph replay of ``model(x)``; ``("eager", note)`` where capture fails."""
    g = GraphedModel(model, clone_output=False)
    g(x)
    if g.note:
        return float("nan"), g.note
    ms = timed(lambda: g(x), 3, repeats)
    g.reset() if hasattr(g, "reset") else None
    return statistics.median(ms), ""


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- tune


def _mixer_inputs(b, l, d, dtype, seed=0):
    torch.manual_seed(seed)
    m = create_model("vim_small" if d == 384 else "vim_test").layers[0].mixer.to(DEV, dtype)
    h = torch.randn(b, l, d, device=DEV, dtype=dtype)
    return m, h


def _tile(spec: str) -> tuple[int, int, int, int]:
    """``BDxU[p][sTS]`` (e.g. ``32x4ps8``) → ``(bd, u, pf, ts)``."""
    m = re.fullmatch(r"(\d+)x(\d+)(p?)(?:s(\d+))?", spec.strip())
    if not m:
        raise SystemExit(f"--tune-configs: {spec!r} is not BDxU[p][sTS] (e.g. 32x4, 32x2p, 32x4s8)")
    return int(m[1]), int(m[2]), int(bool(m[3])), int(m[4] or 1)


def tune(a, results):
    """Scan kernel alone under several tiles; applies the fastest per regime to ``TUNING``."""
    configs = [_tile(c) for c in a.tune_configs.split(",")]
    d, configs = (384, configs) if not a.smoke else (32, [(32, 2, 0, 1), (32, 2, 1, 1), (32, 2, 0, 2)])
    rows = []
    best = {}
    before = {k: tb.TUNING[k] for k in ("scan", "scan_small")}
    batches = [int(v) for v in a.tune_batches.split(",")]
    for b, l in [(b, l) for b in batches for l in (197, 136)] if not a.smoke else ((1, 9),):
        m, h = _mixer_inputs(b, l, d, torch.float16)
        fwd, bwd = m._params(False), m._params(True)
        with torch.no_grad():
            _, saved = tb._forward(h, m.in_proj.weight, fwd, bwd, True, save=False)
        xz, xc, xdbl_f, xdbl_b, delta_f, delta_b = saved[:6]
        e = xz.shape[-1] // 2
        key = "scan" if b >= 64 else "scan_small"
        for bd, u, pf, ts in configs:
            if ts > 1 and key == "scan":  # the large grid never splits: same kernel as ts 1
                continue
            cfg = {"bd": bd, "u": u, "pf": pf, "ts": ts}
            tb.TUNING[key] = cfg  # only the regime being timed: the other keeps its tile

            def go():
                tb.scan_fwd(xc, delta_f, delta_b, xdbl_f, xdbl_b, xz[..., e:], fwd, bwd, 0.5, False)
            # the small-grid regime (batch 1) is timed inside a CUDA graph: eager, the host's launch
            # of one call outweighs the kernel and picked tiles at random
            ms = statistics.median(timed(go, 3, 20) if key == "scan" else timed_in_graph(go))
            rows.append(dict(b=b, l=l, bd=bd, u=u, pf=pf, ts=ts, ms=ms))
            if l == (197 if not a.smoke else 9) and (key not in best or ms < best[key][1]):
                best[key] = (cfg, ms)
            print(f"  tune scan b={b:3d} l={l} bd={bd:3d} u={u} pf={pf} ts={ts}: {ms * 1e3:8.1f} us", flush=True)
    tb.TUNING.update(before)
    for key, (cfg, _) in best.items():
        tb.TUNING[key] = cfg
    results["tune"] = dict(rows=rows, chosen={k: v[0] for k, v in best.items()})
    print(f"  tuned: {results['tune']['chosen']}", flush=True)


# --------------------------------------------------------------------------- mixer


def mixer(a, results):
    d = 384 if not a.smoke else 32
    rows = []
    for b, l in ((128, 197), (128, 136), (1, 197)) if not a.smoke else ((1, 9),):
        for dtype, train in ((torch.float16, False), (torch.bfloat16, True)):
            m, h = _mixer_inputs(b, l, d, dtype)
            outs = {}
            for backend in a.backends.split(","):
                set_backend(m, backend)
                if train:
                    hh = h.clone().requires_grad_(True)
                    dy = torch.randn(b, l, d, device=DEV, dtype=dtype)

                    def go():
                        torch.autograd.grad(m(hh), [hh, *m.parameters()], dy)
                else:
                    def go():
                        with torch.inference_mode():
                            m(h)
                with torch.inference_mode():
                    outs[backend] = m(h)
                ms = statistics.median(timed(go, a.warmup, a.repeats * 2))
                rows.append(dict(b=b, l=l, dtype=str(dtype), pass_="fwd+bwd" if train else "fwd", backend=backend, ms=ms,
                                 rel_diff_vs_first=rel(outs[backend], next(iter(outs.values())))))
                print(f"  mixer b={b:3d} l={l} {rows[-1]['pass_']:7s} {backend:7s} {ms:8.3f} ms", flush=True)
    results["mixer"] = rows


# --------------------------------------------------------------------------- models


def models(a, results, names=None):
    rows, checks = results.get("models", {}).get("rows", []), results.get("models", {}).get("logits_rel_diff", {})
    results["models"] = dict(rows=rows, logits_rel_diff=checks)  # filled in place: saved after each model
    for name in names or a.models.split(","):
        torch.manual_seed(0)
        base = create_model(name).eval()
        cfg = base.cfg
        merged = convert(base, a.recipe)
        targets = {"plain": base, a.recipe: merged, f"{a.recipe}-sliced": sliced_variant(merged)}
        for t in targets.values():
            t.to(DEV, torch.float16 if DEV == "cuda" else torch.float32)
        dt = next(base.parameters()).dtype
        for bsz, modes in ((128, ("eager", "graph")), (1, ("graph",))) if not a.smoke else ((2, ("eager",)),):
            x = torch.randn(bsz, cfg.in_chans, cfg.img_size, cfg.img_size, device=DEV, dtype=dt)
            for tname, t in targets.items():
                outs = {}
                for backend in a.backends.split(","):
                    set_backend(t, backend)
                    with torch.inference_mode():
                        outs[backend] = t(x[:2])
                    for mode in modes:
                        if mode == "eager":
                            def go():
                                with torch.inference_mode():
                                    t(x)
                            ms, note = statistics.median(timed(go, a.warmup, a.repeats)), ""
                        else:
                            ms, note = graph_ms(t, x, a.graph_repeats)
                        rows.append(dict(model=name, target=tname, batch=bsz, mode=mode, backend=backend, ms=ms,
                                         images_per_s=bsz / ms * 1e3, note=note))
                        print(f"  {name:9s} {tname:12s} b={bsz:3d} {mode:5s} {backend:7s} {ms:9.3f} ms {bsz / ms * 1e3:9.1f} im/s",
                              flush=True)
                first = next(iter(outs))
                for backend, o in outs.items():
                    if tname != f"{a.recipe}-sliced":
                        checks[f"{name}/{tname}/{backend} vs {first}"] = rel(o, outs[first])
            if DEV == "cuda":
                torch.cuda.empty_cache()
        del targets, base, merged
        a.save(results)


# --------------------------------------------------------------------------- kernels


def kernels(a, results):
    """Where batch 1 goes: device time per kernel name of one forward (batch 1, fp16, profiled
    eagerly: the same kernels a CUDA graph replays), plain and ``--recipe``, per backend."""
    from kernel_profile import kernel_times, summary

    name = a.models.split(",")[0]
    torch.manual_seed(0)
    plain = create_model(name).eval()
    targets = {"plain": plain, a.recipe: convert(plain, a.recipe)}
    out = {}
    reps = 5 if not a.smoke else 1
    for tname, model in targets.items():
        model.to(DEV, torch.float16 if DEV == "cuda" else torch.float32)
        x = torch.randn(1, model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size, device=DEV,
                        dtype=next(model.parameters()).dtype)
        for backend in a.backends.split(","):
            set_backend(model, backend)
            with torch.inference_mode():
                for _ in range(3):
                    model(x)
                res = summary(kernel_times(lambda: model(x), reps), top=25)
            out[f"{tname}/{backend}"] = res
            print(f"  kernels {name} {tname} b=1 {backend}: {res['device_ms']:.3f} ms of device time, "
                  f"{res['launches']:.0f} kernels per forward", flush=True)
            for k in res["top"][:14]:
                print(f"    {k['ms']:7.3f} ms {k['calls']:4.0f}x  {k['kernel'][:90]}", flush=True)
    results["kernels"] = out


# --------------------------------------------------------------------------- timeline


def _trace_kernels(fn, runs: int) -> list[tuple[float, float, str]]:
    """``(start µs, duration µs, name)`` of every kernel, memcpy and memset the GPU ran during
    ``runs`` calls of ``fn``, in start order (torch.profiler's trace; CUPTI sees graph nodes)."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.unlink(path)
    ops_ = [(float(e["ts"]), float(e.get("dur", 0)), e.get("name", "?")) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(ops_)


def timeline(a, results):
    """Batch 1 in a CUDA graph, where the time goes between the GPU's operations: per target
    (plain, ``--recipe``, its zero-cost-slicing twin) on the last backend, the replay time of
    back-to-back replays and of one replay as ``models`` times it, and from a profiler trace of
    replays: kernel time, idle gaps between consecutive kernels, and which kernels the largest
    gaps precede."""
    name = a.models.split(",")[0]
    backend = a.backends.split(",")[-1]
    torch.manual_seed(0)
    plain = create_model(name).eval()
    merged = convert(plain, a.recipe)
    targets = {"plain": plain, a.recipe: merged, f"{a.recipe}-sliced": sliced_variant(merged)}
    out = {}
    runs = 5 if not a.smoke else 1
    for tname, t in targets.items():
        t.to(DEV, torch.float16 if DEV == "cuda" else torch.float32)
        set_backend(t, backend)
        x = torch.randn(1, t.cfg.in_chans, t.cfg.img_size, t.cfg.img_size, device=DEV, dtype=next(t.parameters()).dtype)
        g = GraphedModel(t, clone_output=False)
        replay = g.replayer(x)
        single = statistics.median(timed(replay, 3, a.graph_repeats))
        n = 20 if not a.smoke else 1

        def burst():
            for _ in range(n):
                replay()
        back_to_back = statistics.median(timed(burst, 1, 5) if not a.smoke else timed(burst, 0, 1)) / n
        res = dict(single_ms=single, back_to_back_ms=back_to_back, note=g.note)
        if DEV == "cuda" and not g.note:
            ops_ = _trace_kernels(replay, runs)
            per = len(ops_) // runs
            spans, busy, gaps_before = [], [], {}
            for k in range(runs):
                rep = ops_[k * per:(k + 1) * per]
                spans.append(rep[-1][0] + rep[-1][1] - rep[0][0])
                busy.append(sum(d for _, d, _ in rep))
                for (t0, d0, _), (t1, _, n1) in zip(rep, rep[1:]):
                    key = n1[:60]
                    gaps_before[key] = gaps_before.get(key, 0.0) + max(0.0, t1 - (t0 + d0)) / runs
            names = {}
            for _, d, nm in ops_:
                c, s = names.get(nm[:60], (0, 0.0))
                names[nm[:60]] = (c + 1 / runs, s + d / runs)
            res.update(ops_per_forward=per, span_ms=statistics.median(spans) / 1e3, busy_ms=statistics.median(busy) / 1e3,
                       gap_ms=(statistics.median(spans) - statistics.median(busy)) / 1e3,
                       gaps_before=[dict(kernel=k, ms=v / 1e3) for k, v in sorted(gaps_before.items(), key=lambda kv: -kv[1])[:12]],
                       kernels=[dict(kernel=k, calls=c, ms=s / 1e3) for k, (c, s) in sorted(names.items(), key=lambda kv: -kv[1][1])[:25]])
        out[tname] = res
        print(f"  timeline {name} {tname:12s} b=1 {backend}: replay {single:.3f} ms, back-to-back {back_to_back:.3f} ms"
              + (f", trace span {res['span_ms']:.3f} = busy {res['busy_ms']:.3f} + gaps {res['gap_ms']:.3f} ms "
                 f"({res['ops_per_forward']} ops)" if "span_ms" in res else ""), flush=True)
        for row in res.get("gaps_before", [])[:6]:
            print(f"    gap {row['ms'] * 1e3:7.1f} us before {row['kernel']}", flush=True)
        for row in res.get("kernels", [])[:10]:
            print(f"    {row['ms'] * 1e3:7.1f} us {row['calls']:5.0f}x {row['kernel']}", flush=True)
        g.reset()
    results.setdefault("timeline", {})[f"{name}/{backend}"] = out


# --------------------------------------------------------------------------- retrain


def retrain(a, results):
    spec = importlib.util.spec_from_file_location("bench_retrain", Path(__file__).with_name("bench_retrain.py"))
    br = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(br)
    rows = []
    for backend in a.backends.split(","):
        ns = br._args(["--model", "vim_small" if not a.smoke else "vim_test", "--recipes", f"none,{a.recipe}",
                       "--batch", "128" if not a.smoke else "2", "--precisions", "bf16" if DEV == "cuda" else "fp32",
                       "--steps", str(a.retrain_steps), "--warmup", "3", "--repeats", "2", "--ops", backend])
        rep = br.run(ns)
        for r in rep["results"]:
            rows.append(dict(backend=backend, **{k: r[k] for k in ("recipe", "precision", "images_per_s", "ms_per_step", "finite")},
                             max_memory_gib=r.get("max_memory_gib")))
            print(f"  retrain {backend:7s} {r['recipe']:5s} {r['precision']}: {r['images_per_s']:8.1f} img/s", flush=True)
    results["retrain"] = rows


# --------------------------------------------------------------------------- report


def table(results, backends) -> list[str]:
    base, new = backends[0], backends[-1]
    lines = []
    if "models" in results:
        rows = results["models"]["rows"]
        idx = {(r["model"], r["target"], r["batch"], r["mode"], r["backend"]): r for r in rows}
        lines.append(f"{'model':9s} {'batch/mode':11s} {'target':12s} {base + ' ms':>10s} {new + ' ms':>10s} {'x vs ' + base:>9s} "
                     f"{'x vs plain ' + base:>16s}")
        for (mdl, tgt, bsz, mode, be), r in idx.items():
            if be != new:
                continue
            b_row = idx.get((mdl, tgt, bsz, mode, base))
            plain = idx.get((mdl, "plain", bsz, mode, base))
            lines.append(f"{mdl:9s} {f'{bsz} {mode}':11s} {tgt:12s} {b_row['ms'] if b_row else float('nan'):10.3f} {r['ms']:10.3f} "
                         f"{(b_row['ms'] / r['ms']) if b_row else float('nan'):9.2f} {(plain['ms'] / r['ms']) if plain else float('nan'):16.2f}")
    for r in results.get("retrain", []):
        lines.append(f"retrain vim_small {r['recipe']:5s} {r['precision']} {r['backend']:7s} {r['images_per_s']:8.1f} img/s")
    if "tune" in results:
        lines.append(f"tuned scan tiles: {results['tune']['chosen']}")
    return lines


def main(argv=None) -> int:
    a = _args(argv)
    if a.smoke:
        a.models, a.repeats, a.warmup, a.graph_repeats, a.retrain_steps = "vim_test", 1, 0, 1, 1
        a.backends = "ref,triton" if DEV == "cpu" else a.backends
    if a.tuning:
        tb.TUNING.update(json.loads(a.tuning))
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    results = {"device": dev, "torch": torch.__version__, "kernels": ops.kernels_available(), "args": dict(vars(a))}
    print(f"{dev}, torch {torch.__version__}, kernels {ops.kernels_available()}", flush=True)
    t0 = time.perf_counter()

    def save(res):
        res["tuning_used"] = json.loads(json.dumps(tb.TUNING))
        res["wall_s"] = time.perf_counter() - t0
        Path(a.out).write_text(json.dumps(res, indent=1, default=str) + "\n")

    a.save = save
    for section in a.sections.split(","):
        name, _, arg = section.partition("=")
        fn = {"tune": tune, "mixer": mixer, "models": models, "retrain": retrain, "kernels": kernels,
              "timeline": timeline}[name]
        fn(a, results, arg.split("+")) if arg else fn(a, results)
        save(results)  # after each section (and each model): a timeout keeps what was measured
    print(f"\n{dev} · fp16 models (random weights) · retrain bf16 · median ms")
    print("\n".join(table(results, a.backends.split(","))))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
