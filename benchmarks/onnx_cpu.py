"""ONNX Runtime on the CPU: export time, graph size, parity and latency of Vim-Ti / Vim-S (plain
and R-MeeTo r031) beside DeiT-Ti from timm, all exported the same way and timed in the same run.

For every Vim variant and scan form (``--scans``, default ``loop ssd``; the second form only for
``--all-scans-on`` models, default Vim-Ti):
:func:`compressor.export.export_onnx` with a dynamic batch (parity-checked against PyTorch on
seeded images: max relative difference and top-1 agreement), timed (wall and process CPU).
DeiT-Ti (``timm.create_model('deit_tiny_patch16_224')``, random weights) goes through the same
exporter (``torch.onnx.export(dynamo=True)`` + the same light optimisation) and the same check.
``--cli`` also times the real ``rmeeto export CKPT --onnx OUT`` (defaults: static batch 1, default
scan form) of Vim-S plain and r031 checkpoints in a subprocess (wall and child CPU time).

Latency: one ``InferenceSession`` per file (CPU provider, intra-op threads ``--threads``,
default 2, ``ORT_ENABLE_ALL``); at each batch size the sessions take turns run by run (a burst
of load from other processes hits all alike), ``--warmup`` then ``--repeats`` runs; median,
min and max are reported (the spread shows how busy the machine was). Random weights: the time
does not depend on them. Writes ``--out`` (JSON) and prints the Markdown table of
docs/benchmarks.md.

    OMP_NUM_THREADS=2 python benchmarks/onnx_cpu.py --cli --out benchmarks/results/onnx_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import __version__  # noqa: E402
from compressor._io import atomic_write_text  # noqa: E402
from compressor.convert import convert, save_compressed  # noqa: E402
from compressor.export import export_onnx  # noqa: E402
from compressor.export._graph import light_optimize  # noqa: E402
from compressor.models import create_model  # noqa: E402


def write_results(path: Path | None, results: dict) -> None:
    """The report as JSON at ``path`` (atomically; nothing when ``path`` is None)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(results, indent=2, default=str))
        print(f"wrote {path}")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} cores"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def export_vim(name: str, recipe: str | None, scan: str, out: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    if recipe:
        model = convert(model, recipe)
    t0, c0 = time.perf_counter(), time.process_time()
    report = export_onnx(model, out, dynamic_batch=True, scan=scan)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, **report.to_dict()}


def export_deit(out: Path) -> dict:
    """DeiT-Ti through the same exporter and optimisation, checked the same way."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=False, verify=False,
                                    report=False, verbose=False)
    light_optimize(program.model)
    program.save(out, external_data=False)
    export_s = time.perf_counter() - t0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probe = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    got = sess.run(None, {"image": probe.numpy()})[0]
    with torch.no_grad():
        ref = model(probe).numpy()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "export_seconds": export_s,
            "node_count": len(onnx.load(str(out), load_external_data=False).graph.node), "nodes_per_block": None,
            "max_rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "scan": "-"}


def cli_export(name: str, recipe: str | None, tmp: Path) -> dict:
    """The real ``rmeeto export`` of a random-weight checkpoint, in a subprocess."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    ckpt = tmp / f"{name}_{recipe or 'plain'}.pth"
    if recipe:
        save_compressed(convert(model, recipe), ckpt)
    else:
        torch.save({"model": model.state_dict()}, ckpt)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compressor", "export", str(ckpt), "--onnx", str(tmp / "cli.onnx")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"rmeeto export failed:\n{proc.stdout}\n{proc.stderr}")
    table = {k.strip(): v.strip() for k, v in (ln.strip("│ ").split("│", 1) for ln in proc.stdout.splitlines() if ln.count("│") >= 3)}
    return {"model": name, "recipe": recipe or "plain", "wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "reported": table}


def time_sessions(paths: dict[str, Path], batches, threads: int, warmup: int, repeats: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    out: dict = {k: {} for k in paths}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, {"image": x})
        times: dict = {k: [] for k in sessions}
        for _ in range(repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"image": x})
                times[k].append(1e3 * (time.perf_counter() - t0))
        for k, ms in times.items():
            out[k][b] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs": len(ms)}
        print(f"batch {b}: " + ", ".join(f"{k} {v[b]['median_ms']:.1f} ms" for k, v in out.items()), flush=True)
    return out


def markdown(results: dict) -> str:
    b1, b8 = (str(b) for b in results["batches"][:2])
    rows = ["| model | scan | export (wall / CPU) | nodes (per block) | max rel. diff | top-1 | "
            f"ORT batch {b1}: median (min–max) | vs DeiT-Ti | ORT batch {b8}: median (min–max) | vs DeiT-Ti |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    deit = results["variants"]["deit_tiny"]["latency"]
    for key, v in results["variants"].items():
        e, lat = v["export"], v["latency"]
        per = f" ({e['nodes_per_block']:.0f})" if e.get("nodes_per_block") else ""
        cells = [key.split("|")[0], e["scan"], f"{e['wall_s']:.0f} s / {e['cpu_s']:.0f} s", f"{e['node_count']:,}{per}",
                 f"{e['max_rel_diff']:.1e}", f"{e['top1_agreement']:.0%}"]
        for b in (b1, b8):
            t = lat[b] if b in lat else lat[int(b)]
            d = deit[b] if b in deit else deit[int(b)]
            cells += [f"{t['median_ms']:.0f} ms ({t['min_ms']:.0f}–{t['max_ms']:.0f})", f"x{t['median_ms'] / d['median_ms']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vim_tiny", "vim_small"])
    p.add_argument("--recipe", default="r031")
    p.add_argument("--scans", nargs="+", default=["loop", "ssd"], help="scan forms; the first one for every model")
    p.add_argument("--all-scans-on", nargs="*", default=["vim_tiny"], help="models exported in every scan form (others: the first)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (also set OMP_NUM_THREADS)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cli", action="store_true", help="also time `rmeeto export` of Vim-S plain and r031 (subprocess)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {
        "machine": {"cpu": cpu_name(), "ort_threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_avg_start": os.getloadavg()},
        "versions": {"rmeeto": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "batches": args.batches, "variants": {}, "cli_export": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {}
        print("exporting deit_tiny ...", flush=True)
        paths["deit_tiny"] = tmp / "deit_tiny.onnx"
        results["variants"]["deit_tiny"] = {"export": export_deit(paths["deit_tiny"])}
        for name in args.models:
            for recipe in (None, args.recipe):
                for scan in args.scans if name in args.all_scans_on else args.scans[:1]:
                    key = f"{name} {recipe or 'plain'}|{scan}"
                    print(f"exporting {key} ...", flush=True)
                    paths[key] = tmp / f"{name}_{recipe or 'plain'}_{scan}.onnx"
                    results["variants"][key] = {"export": export_vim(name, recipe, scan, paths[key])}
                    e = results["variants"][key]["export"]
                    print(f"  {e['wall_s']:.0f} s wall, {e['cpu_s']:.0f} s CPU, {e['node_count']} nodes, rel {e['max_rel_diff']:.1e}", flush=True)
        if args.cli:
            for recipe in (None, args.recipe):
                print(f"rmeeto export vim_small {recipe or 'plain'} ...", flush=True)
                results["cli_export"].append(cli_export("vim_small", recipe, tmp))
                print(f"  {results['cli_export'][-1]['wall_s']:.0f} s wall, {results['cli_export'][-1]['cpu_s']:.0f} s CPU", flush=True)
        latency = time_sessions(paths, args.batches, args.threads, args.warmup, args.repeats)
    for key, lat in latency.items():
        results["variants"][key]["latency"] = lat
    results["machine"]["load_avg_end"] = os.getloadavg()
    table = markdown(results)
    print(table)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
