"""ONNX Runtime CPU latency of Vim, plain vs converted (R-MeeTo r031: 11 tokens merged every
2nd layer, 197 -> 76 tokens on 224 px).

Exports both with :func:`compressor.export.export_onnx` (dynamic batch, parity-checked against
PyTorch), then times ``InferenceSession.run`` at each batch size: median of ``--repeats`` runs after
``--warmup``, the two models taking turns run by run, intra-op threads = all cores. ``--profile`` adds ONNX Runtime's per-op-type time
split at the largest batch, to see what dominates. Random weights: latency does not depend on
them (the merge does the same work whatever it matches).

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
import onnxruntime as ort
import torch

from compressor.convert import convert
from compressor.export import export_onnx
from compressor.merge import MergeConfig
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


def latencies_ms(sessions: dict[str, ort.InferenceSession], shape: tuple, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of ``sess.run`` per session. The sessions take turns run by run, so a
    burst of load from other processes hits all of them alike instead of one variant's block."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def op_profile(path: Path, shape: tuple, threads: int, runs: int = 3) -> dict[str, float]:
    """Share of node time per ONNX op type over ``runs`` runs (ORT's profiler)."""
    sess = session(path, threads, profile=True)
    latencies_ms({"": sess}, shape, warmup=1, repeats=runs)
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
    p.add_argument("--keep-dir", type=Path, help="write the .onnx files here instead of a temp folder")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()

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
            print(f"exporting {name} ...", flush=True)
            report = export_onnx(module, paths[name], dynamic_batch=True, batch=1)
            results["variants"][name] = {"report": report.to_dict(), "tokens_last_layer": _tokens_last(module, cfg), "latency_ms": {}}
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        for b in args.batches:
            shape = (b, cfg.in_chans, cfg.img_size, cfg.img_size)
            for name, ms in latencies_ms(sessions, shape, args.warmup, args.repeats).items():
                results["variants"][name]["latency_ms"][b] = ms
        for name, entry in results["variants"].items():
            if args.profile:
                entry["op_share"] = op_profile(paths[name], (max(args.batches), cfg.in_chans, cfg.img_size, cfg.img_size), args.threads)
            _print_variant(name, entry)
    plain, merged = results["variants"].values()
    results["speedup"] = {b: plain["latency_ms"][b] / merged["latency_ms"][b] for b in args.batches}
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    for b, s in results["speedup"].items():
        print(f"speed-up at batch {b}: {s:.2f}x (plain {plain['latency_ms'][b]:.1f} ms, merged {merged['latency_ms'][b]:.1f} ms)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")


def _tokens_last(module, cfg) -> int:
    steps = getattr(module, "steps", [])
    return steps[-1].tokens_out if steps else cfg.num_tokens


def _print_variant(name: str, e: dict) -> None:
    r = e["report"]
    print(f"{name}: {r['node_count']} nodes, {r['file_size'] / 2**20:.1f} MiB, export {r['export_seconds']:.1f} s, "
          f"max rel diff {r['max_rel_diff']:.2e}, top-1 agreement {r['top1_agreement']:.0%}, "
          f"{e['tokens_last_layer']} tokens in the last layer")
    for b, ms in e["latency_ms"].items():
        print(f"  ORT CPU batch {b}: {ms:.1f} ms ({1e3 * b / ms:.1f} img/s)")
    if "op_share" in e:
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(e["op_share"].items())[:8])
        print(f"  time by op type: {top}")


if __name__ == "__main__":
    main()
