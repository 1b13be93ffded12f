"""Two (or more) checkouts' ONNX exports of one model timed side by side on ONNX Runtime's CPU
provider: what a change of the exported graph buys, measured in one run on one machine.

Each ``--checkout LABEL=DIR`` exports the model (default Vim-Ti r031, random weights seeded,
dynamic batch, ``--scan`` form) with the ``compressor`` package of ``DIR`` in a subprocess
(``PYTHONPATH=DIR``), which also checks parity against PyTorch; the files are then timed by
:func:`onnx_cpu.time_sessions` (the sessions take turns run by run, so a burst of load from
other processes hits all alike; median, min and max). With ``--workdir`` the files (and their
export reports) are kept there and reused by a re-run (``--fresh`` re-exports). Writes ``--out``
(JSON) and prints a table.

    git worktree add /tmp/before <commit>
    OMP_NUM_THREADS=2 python benchmarks/onnx_cpu_ab.py --checkout before=/tmp/before after=. \\
        --repeats 20 --out benchmarks/results/onnx_cpu_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_cpu import cpu_name, time_sessions, write_results  # noqa: E402

_EXPORT = """
import json, sys, time, torch
from compressor.convert import convert
from compressor.export import export_onnx
from compressor.export._graph import block_node_counts
from compressor.models import create_model
import onnx
name, recipe, out, scan = sys.argv[1:5]
torch.manual_seed(0)
model = create_model(name).eval()
if recipe != "none":
    model = convert(model, recipe)
t0 = time.perf_counter()
report = export_onnx(model, out, dynamic_batch=True, **({} if scan == "default" else {"scan": scan}))
wall = time.perf_counter() - t0
graph = onnx.load(out).graph
consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
flips = sum(n.op_type == "Slice" and len(n.input) > 4 and n.input[4] in consts and bool((consts[n.input[4]] < 0).any()) for n in graph.node)
print(json.dumps({"wall_s": wall, "nodes": report.node_count, "nodes_per_block": report.nodes_per_block,
                  "max_rel_diff": report.max_rel_diff, "top1_agreement": report.top1_agreement, "negative_step_slices": flips}))
"""


def export(label: str, checkout: Path, name: str, recipe: str, out: Path, scan: str = "default") -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    proc = subprocess.run([sys.executable, "-c", _EXPORT, name, recipe, str(out), scan], env=env, capture_output=True, text=True,
                          cwd=checkout)
    if proc.returncode:
        sys.exit(f"export with {label} ({checkout}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", nargs="+", required=True, help="LABEL=DIR: a checkout whose compressor exports the model")
    p.add_argument("--model", default="vim_tiny")
    p.add_argument("--recipe", default="r031", help="'none' for the plain model")
    p.add_argument("--scan", default="default", help="export scan form (loop, ssd; default: the export default)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (also set OMP_NUM_THREADS)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--workdir", type=Path, help="keep the exported files here; a re-run times them again")
    p.add_argument("--fresh", action="store_true", help="re-export even when --workdir holds the files")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    checkouts = dict(c.split("=", 1) for c in args.checkout)
    results: dict = {"machine": {"cpu": cpu_name(), "ort_threads": args.threads, "load_avg_start": os.getloadavg()},
                     "model": args.model, "recipe": args.recipe, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = {}
        for label, checkout in checkouts.items():
            paths[label] = work / f"{args.model}_{args.recipe}_{label}.onnx"
            report = paths[label].with_suffix(".json")
            if args.fresh or not (paths[label].is_file() and report.is_file()):
                print(f"exporting with {label} ({checkout}) ...", flush=True)
                report.write_text(json.dumps(export(label, Path(checkout), args.model, args.recipe, paths[label], args.scan)))
            results["variants"][label] = {"checkout": checkout, "export": json.loads(report.read_text())}
            print(f"  {label}: {results['variants'][label]['export']}", flush=True)
        latency = time_sessions(paths, args.batches, args.threads, args.warmup, args.repeats)
    results["machine"]["load_avg_end"] = os.getloadavg()
    print(f"\n{args.model} {args.recipe}, {results['machine']['cpu']}, ORT {args.threads} threads, {args.repeats} runs each")
    print("| checkout | nodes per block | Slice step -1 | max rel. diff | " + " | ".join(f"batch {b}: median (min–max)" for b in args.batches) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in args.batches) + " |")
    for label, lat in latency.items():
        results["variants"][label]["latency"] = lat
        e = results["variants"][label]["export"]
        cells = [f"{lat[b]['median_ms']:.0f} ms ({lat[b]['min_ms']:.0f}–{lat[b]['max_ms']:.0f})" for b in args.batches]
        print(f"| {label} | {e['nodes_per_block']:.0f} | {e['negative_step_slices']} | {e['max_rel_diff']:.1e} | " + " | ".join(cells) + " |")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
