"""ONNX Runtime CPU latency of Vim, plain vs converted (R-MeeTo r031: 11 tokens merged every
2nd layer, 197 -> 76 tokens on 224 px).

Exports both with :func:`compressor.export.export_onnx` (dynamic batch, parity-checked against
PyTorch), then times ``InferenceSession.run`` at each batch size: median (and minimum) of
``--repeats`` runs after ``--warmup``, the two models taking turns run by run, intra-op threads =
all cores. ``--profile`` adds ONNX Runtime's time split per op type at the largest batch, to see
what dominates. Random weights: latency does not depend on them (a merge does the same work
whatever it matches). Exporting a depth-24 model takes minutes: ``--keep-dir DIR`` keeps the
files and ``--reuse`` times them again without re-exporting.

    python benchmarks/bench_onnx_cpu.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from compressor.convert import convert
from compressor.export import export_onnx
from compressor.merge import MergeConfig, tokens_per_layer
from compressor.models import create_model


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_profiling = profile
    if profile:
        opts.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_times_ms(sessions: dict[str, ort.InferenceSession], shape: tuple, warmup: int, repeats: int,
                 pause: float = 0.0) -> dict[str, list[float]]:
    """Wall times of ``sess.run`` per session, in ms. The sessions take turns run by run, so a
    burst of load from other processes hits all of them alike instead of one variant's block;
    ``pause`` seconds before each run let the other session's spinning workers go idle."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(1e3 * (time.perf_counter() - t0))
    return times


def op_profile(path: Path, shape: tuple, threads: int, runs: int = 3) -> dict[str, float]:
    """Share of node time per ONNX op type over ``runs`` runs (ORT's profiler)."""
    sess = session(path, threads, profile=True)
    run_times_ms({"": sess}, shape, warmup=1, repeats=runs)
    trace = Path(sess.end_profiling())
    totals: dict[str, float] = defaultdict(float)
    for ev in json.loads(trace.read_text()):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            totals[ev["args"]["op_name"]] += ev["dur"]
    trace.unlink()
    all_us = sum(totals.values()) or 1.0
    return {op: us / all_us for op, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vim_tiny")
    p.add_argument("--num-prune", type=int, default=11, help="tokens merged every 2nd layer (11 = r031)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ORT intra-op threads (default: all cores)")
    p.add_argument("--profile", action="store_true", help="print ORT's time split per op type at the largest batch")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between timed runs (lets ORT's spinning threads sleep)")
    p.add_argument("--keep-dir", type=Path, help="write the .onnx files here instead of a temp folder")
    p.add_argument("--reuse", action="store_true", help="time the files already in --keep-dir instead of exporting again")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()
    if args.reuse and not args.keep_dir:
        p.error("--reuse needs --keep-dir")

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    variants = {"plain": model, f"merged(num_prune={args.num_prune})": convert(model, MergeConfig(num_prune=args.num_prune))}
    cfg = model.cfg
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1m_start": os.getloadavg()[0],
                    "processor": platform.processor() or platform.machine()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "model": args.model, "img_size": cfg.img_size, "depth": cfg.depth, "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep_dir or Path(tmp)
        paths = {}
        for name, module in variants.items():
            paths[name] = out_dir / f"{args.model}_{name.split('(')[0]}.onnx"
            if args.reuse and paths[name].is_file():
                report = {"node_count": len(onnx.load(str(paths[name])).graph.node), "file_size": paths[name].stat().st_size}
            else:
                print(f"exporting {name} ...", flush=True)
                report = export_onnx(module, paths[name], dynamic_batch=True, batch=1).to_dict()
            results["variants"][name] = {"report": report, "token_layers": _token_layers(module, cfg),
                                        "latency_ms": {}, "latency_min_ms": {}}
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        for b in args.batches:
            shape = (b, cfg.in_chans, cfg.img_size, cfg.img_size)
            for name, ms in run_times_ms(sessions, shape, args.warmup, args.repeats, args.pause).items():
                results["variants"][name]["latency_ms"][b] = statistics.median(ms)
                results["variants"][name]["latency_min_ms"][b] = min(ms)
        for name, entry in results["variants"].items():
            if args.profile:
                entry["op_share"] = op_profile(paths[name], (max(args.batches), cfg.in_chans, cfg.img_size, cfg.img_size), args.threads)
            _print_variant(name, entry)
    plain, merged = results["variants"].values()
    results["speedup"] = {b: plain["latency_ms"][b] / merged["latency_ms"][b] for b in args.batches}
    results["speedup_min"] = {b: plain["latency_min_ms"][b] / merged["latency_min_ms"][b] for b in args.batches}
    results["token_layer_ratio"] = sum(plain["token_layers"]) / sum(merged["token_layers"])
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    for b, s in results["speedup"].items():
        print(f"speed-up at batch {b}: {s:.2f}x on medians (plain {plain['latency_ms'][b]:.1f} ms, merged {merged['latency_ms'][b]:.1f} ms), "
              f"{results['speedup_min'][b]:.2f}x on minima")
    print(f"token-layer ratio (the ceiling when the scan dominates): {results['token_layer_ratio']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")


def _token_layers(module, cfg) -> list[int]:
    return tokens_per_layer(list(getattr(module, "steps", [])), cfg.num_tokens, cfg.depth)


def _print_variant(name: str, e: dict) -> None:
    r, tokens = e["report"], e["token_layers"]
    checked = (f"export {r['export_seconds']:.1f} s, max rel diff {r['max_rel_diff']:.2e}, top-1 agreement {r['top1_agreement']:.0%}"
               if "export_seconds" in r else "reused file (not re-exported)")
    print(f"{name}: {r['node_count']} nodes, {r['file_size'] / 2**20:.1f} MiB, {checked}, "
          f"tokens {tokens[0]} -> {tokens[-1]} ({sum(tokens)} token-layers)")
    for b, ms in e["latency_ms"].items():
        print(f"  ORT CPU batch {b}: median {ms:.1f} ms ({1e3 * b / ms:.1f} img/s), min {e['latency_min_ms'][b]:.1f} ms")
    if "op_share" in e:
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(e["op_share"].items())[:8])
        print(f"  time by op type: {top}")


if __name__ == "__main__":
    main()
