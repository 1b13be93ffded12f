"""Where the time of an exported Vim goes on ONNX Runtime's CPU provider: the profiler's
per-node times aggregated by op type, by where the node lives (inside a ``Scan`` body or the
main graph) and by the top nodes, beside the wall time of the same runs.

Exports Vim-Ti plain and r031 (``--scan``, default the export default) with a dynamic batch into
``--workdir`` (kept: re-runs reuse the files; ``--fresh`` re-exports), and DeiT-Ti from timm
through the same exporter; then per file and batch size one session with
``SessionOptions.enable_profiling`` (CPU provider, ``--threads`` intra-op threads,
``ORT_ENABLE_ALL``), ``--warmup`` + ``--repeats`` runs, and the profile's ``Node`` events of
the timed runs summed (per run). "scan steps" is the time ORT reports for the ``Scan`` nodes
themselves (bodies included), "scan bodies" the sum of the body's nodes, the difference the
per-iteration overhead of the ``Scan`` machinery.

    OMP_NUM_THREADS=2 python benchmarks/onnx_cpu_profile.py --out benchmarks/results/onnx_cpu_profile.json

On a GPU host with onnxruntime-gpu first on ``PYTHONPATH`` (``benchmarks/onnx_gpu.sh`` installs
it), ``--provider cuda`` profiles the CUDA execution provider the same way, e.g. per scan form:
``--provider cuda --scan loop --batches 1 128``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_cpu import cpu_name, export_deit, export_vim, write_results  # noqa: E402

from compressor import __version__  # noqa: E402


def body_node_names(path: Path) -> set[str]:
    """Names of the nodes inside any subgraph (``Scan``/``Loop`` bodies) of the file."""
    names: set[str] = set()

    def walk(graph, inside: bool):
        for node in graph.node:
            if inside:
                names.add(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, True)

    walk(onnx.load(str(path), load_external_data=False).graph, False)
    return names


def profile_file(path: Path, batch: int, threads: int, warmup: int, repeats: int, workdir: Path,
                 provider: str = "cpu") -> dict:
    """Per-run times (wall) and the profiler's node times of ``repeats`` runs, aggregated.
    ``provider`` ``cuda``: the CUDA execution provider (its node times are the host's time per
    node, launches included, not the GPU's kernel time: they show where the host spends a run)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / f"prof_{path.stem}_b{batch}")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise SystemExit(f"ONNX Runtime did not take {providers[0]} (has {sess.get_providers()}): install onnxruntime-gpu")
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {"image": x})
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"image": x})
        walls.append(1e3 * (time.perf_counter() - t0))
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()  # tens of MB per file
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed_from = runs[warmup]["ts"] if len(runs) > warmup else 0  # skip the warm-up runs
    inside = body_node_names(path)
    by_type: dict = defaultdict(float)
    by_node: dict = defaultdict(float)
    where: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < timed_from:
            continue
        node = e["name"].removesuffix("_kernel_time")
        op = e.get("args", {}).get("op_name", "?")
        ms = e["dur"] / 1e3 / repeats
        in_body = node in inside
        by_type[("body " if in_body else "") + op] += ms
        calls[("body " if in_body else "") + op] += 1
        if not in_body:
            by_node[node] += ms
        where["scan bodies" if in_body else ("scan steps" if op == "Scan" else "main graph")] += ms
    scan_total = where.get("scan steps", 0.0)
    summary = {
        "wall_ms": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
        "model_run_ms": statistics.median(e["dur"] / 1e3 for e in runs[warmup:]) if len(runs) > warmup else None,
        "main_graph_ms": where.get("main graph", 0.0),
        "scan_nodes_ms": scan_total,
        "scan_body_nodes_ms": where.get("scan bodies", 0.0),
        "scan_overhead_ms": scan_total - where.get("scan bodies", 0.0),
        "by_op_type_ms": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "calls_per_run": {k: v // repeats for k, v in calls.items()},
        "top_nodes_ms": dict(sorted(by_node.items(), key=lambda kv: -kv[1])[:15]),
    }
    return summary


def show(name: str, batch: int, s: dict) -> None:
    w = s["wall_ms"]
    print(f"\n== {name}, batch {batch}: wall {w['median']:.1f} ms ({w['min']:.1f}-{w['max']:.1f}), "
          f"profiled run {s['model_run_ms']:.1f} ms")
    print(f"   main graph {s['main_graph_ms']:.1f} ms | Scan nodes {s['scan_nodes_ms']:.1f} ms "
          f"(their body nodes {s['scan_body_nodes_ms']:.1f} ms, Scan machinery {s['scan_overhead_ms']:.1f} ms)")
    for op, ms in list(s["by_op_type_ms"].items())[:12]:
        print(f"   {op:<22} {ms:8.2f} ms  {s['calls_per_run'].get(op, 0):6d} calls/run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vim_tiny")
    p.add_argument("--recipes", nargs="+", default=["r031", "plain"])
    p.add_argument("--scan", default=None, help="export scan form (default: the export default)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rmeeto_onnx_profile")
    p.add_argument("--fresh", action="store_true", help="re-export even when the files exist")
    p.add_argument("--no-deit", action="store_true")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: ONNX Runtime's CUDA execution provider (onnxruntime-gpu; host-side node times)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.provider == "cuda":
        from compressor.export._runtime import providers as ort_providers

        ort_providers()  # onnxruntime.preload_dlls(): the CUDA libraries of PyTorch's wheels
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from compressor import ops

    scan = args.scan or ops.EXPORT_SCAN_DEFAULT
    files, exports = {}, {}
    if not args.no_deit:
        files["deit_tiny"] = args.workdir / "deit_tiny.onnx"
        if args.fresh or not files["deit_tiny"].exists():
            exports["deit_tiny"] = export_deit(files["deit_tiny"])
    for recipe in args.recipes:
        key = f"{args.model} {recipe} {scan}"
        files[key] = args.workdir / f"{args.model}_{recipe}_{scan}.onnx"
        if args.fresh or not files[key].exists():
            print(f"exporting {key} ...", flush=True)
            exports[key] = export_vim(args.model, None if recipe == "plain" else recipe, scan, files[key])
            e = exports[key]
            print(f"  {e['wall_s']:.0f} s, {e['node_count']} nodes, rel {e['max_rel_diff']:.1e}, top-1 {e['top1_agreement']:.0%}")
    results = {"machine": {"cpu": cpu_name(), "ort_threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "load_avg_start": os.getloadavg()},
               "versions": {"rmeeto": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__},
               "scan": scan, "provider": args.provider, "exports": exports, "profiles": {}}
    for batch in args.batches:
        for key, path in files.items():
            s = profile_file(path, batch, args.threads, args.warmup, args.repeats, args.workdir, args.provider)
            results["profiles"][f"{key} b{batch}"] = s
            show(key, batch, s)
    results["machine"]["load_avg_end"] = os.getloadavg()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
