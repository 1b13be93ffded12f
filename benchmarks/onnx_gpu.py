"""ONNX Runtime's CUDA execution provider beside PyTorch on the same GPU, in one run.

For Vim-Ti and Vim-S, plain and R-MeeTo r031 (random weights, seed 0), fp32 and fp16, batch 1
and 128:

1. export (CPU, in parallel worker processes) with ``export_onnx(scan="ssd", batch=B)``: the
   loop-free scan, a fixed batch (all shapes constant, so every node runs on the CUDA provider
   and ONNX Runtime can capture the graph); ``--loop`` also exports the ``loop`` form of
   Vim-Ti fp32 at batch 1 (a ``Scan`` runs token by token from the host: shown for contrast);
2. time on the GPU (5 warm-up + 30 timed calls, median; ``compressor.profile.timing.measure``):
   PyTorch eager and PyTorch in one CUDA graph (``compressor.optimize_for_inference``), ONNX
   Runtime's CUDA provider with IO binding (input read in place from a CUDA tensor, output left
   on the GPU), and the same with ``enable_cuda_graph`` (the whole graph replayed);
3. parity on the timed input: CUDA provider vs PyTorch fp32 and vs the CPU provider (batch 1
   files), max relative difference and top-1 agreement.

Everything lands in ``--out`` (JSON, rewritten after each step, so a run cut short keeps what
it measured) and a Markdown table is printed. Needs ``onnxruntime-gpu`` importable (see
benchmarks/onnx_gpu.sh) and a CUDA device; ``--cpu-smoke`` runs steps 1 and 3 on the CPU
provider with ``vim_test`` (a check of this script, no timings worth keeping).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def build(name: str, recipe: str | None):
    """The model every step uses: same seed, same conversion, so weights match across processes."""
    from compressor.convert import convert
    from compressor.models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    return convert(model, recipe) if recipe else model


def export_job(job: dict) -> dict:
    """One export in a worker process (single-threaded)."""
    torch.set_num_threads(1)
    from compressor.export import export_onnx

    t0 = time.perf_counter()
    report = export_onnx(build(job["model"], job["recipe"]), job["path"], batch=job["batch"], fp16=job["dtype"] == "fp16",
                         scan=job["scan"], check=False)
    return {**job, "export_s": time.perf_counter() - t0, "nodes": report.node_count, "nodes_per_block": report.nodes_per_block}


def export_key(name: str, recipe: str | None, dtype: str, batch: int, scan: str) -> str:
    return f"{name}_{recipe or 'plain'}_{dtype}_b{batch}_{scan}"


def run_exports(jobs: list[dict], workers: int) -> list[dict]:
    """Each job exported in a worker process, unless its file and report are already in place
    (a re-run, or an earlier call that only exported, reuses them)."""
    done, todo = [], []
    for j in jobs:
        meta = Path(j["path"] + ".json")
        if Path(j["path"]).exists() and meta.exists():
            done.append(json.loads(meta.read_text()))
        else:
            todo.append(j)
    if todo:
        ctx = __import__("multiprocessing").get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=max(1, min(workers, len(todo))), mp_context=ctx) as pool:
            for fut in cf.as_completed([pool.submit(export_job, j) for j in todo]):
                r = fut.result()
                Path(r["path"] + ".json").write_text(json.dumps(r))
                print(f"exported {r['key']}: {r['export_s']:.0f} s, {r['nodes']} nodes", flush=True)
                done.append(r)
    return sorted(done, key=lambda r: r["key"])


def export_all(args, work: Path) -> list[dict]:
    jobs = []
    for name in args.models:
        for recipe in (None, args.recipe):
            for dtype in args.dtypes:
                for batch in args.batches:
                    key = export_key(name, recipe, dtype, batch, "ssd")
                    jobs.append(dict(key=key, model=name, recipe=recipe, dtype=dtype, batch=batch, scan="ssd", path=str(work / f"{key}.onnx")))
    if args.loop:
        name = args.models[0]
        jobs.append(dict(key=f"{name}_plain_fp32_b1_loop", model=name, recipe=None, dtype="fp32", batch=1, scan="loop",
                         path=str(work / f"{name}_plain_fp32_b1_loop.onnx")))
    return run_exports(jobs, args.workers)


def ort_runner(path: str, x: torch.Tensor, cuda_graph: bool):
    """A Runner on the CUDA provider with input and output bound to fixed CUDA buffers."""
    from compressor.export import _runtime
    from compressor.profile.timing import Runner

    sess = _runtime.make_session(path, [_runtime.CUDA, _runtime.CPU], cuda_graph=cuda_graph)
    io = sess.io_binding()
    np_dtype = np.float16 if x.dtype == torch.float16 else np.float32
    out_meta = sess.get_outputs()[0]
    out = torch.empty((x.shape[0], out_meta.shape[-1]), dtype=x.dtype, device=x.device)
    io.bind_input(sess.get_inputs()[0].name, "cuda", 0, np_dtype, tuple(x.shape), x.data_ptr())
    io.bind_output(out_meta.name, "cuda", 0, np_dtype, tuple(out.shape), out.data_ptr())

    def run():
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        return out

    return Runner(run, device="cuda", host_timed=True, note="cuda graph" if cuda_graph else ""), out


def cpu_logits(path: str, x: torch.Tensor) -> np.ndarray:
    from compressor.export import _runtime

    sess = _runtime.make_session(path, [_runtime.CPU])
    return sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0].astype(np.float32)


def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    return {"max_rel": float(np.abs(out - ref).max() / np.abs(ref).max()), "top1": float((out.argmax(-1) == ref.argmax(-1)).mean())}


def time_all(args, exports: list[dict], results: dict, save) -> None:
    from compressor import optimize_for_inference
    from compressor.profile.timing import Runner, measure

    dev = torch.device("cuda")
    by_key = {e["key"]: e for e in exports}
    deadline = time.time() + args.budget_s
    for name in args.models:
        for recipe in (None, args.recipe):
            fp32_model = build(name, recipe).to(dev)
            for dtype in args.dtypes:
                model = fp32_model if dtype == "fp32" else build(name, recipe).to(dev).half()
                graphed = optimize_for_inference(model, clone_output=False)
                for batch in args.batches:
                    if time.time() > deadline:
                        results["notes"].append(f"time budget reached before {name} {recipe} {dtype} b{batch}")
                        save()
                        return
                    key = f"{name}_{recipe or 'plain'}_{dtype}_b{batch}_ssd"
                    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)).to(dev, DTYPES[dtype])
                    row = {"model": name, "recipe": recipe or "plain", "dtype": dtype, "batch": batch, **{k: by_key[key][k] for k in ("export_s", "nodes", "nodes_per_block")}}
                    with torch.inference_mode():
                        ref = fp32_model(x.float()).float().cpu().numpy()
                        row["torch_eager_ms"] = measure(Runner(lambda: model(x), "cuda"), batch, warmup=5, repeats=30)["latency_ms_median"]
                        graphed(x)
                        row["torch_graph_ms"] = measure(Runner(lambda: graphed(x), "cuda"), batch, warmup=5, repeats=30)["latency_ms_median"]
                        torch_out = graphed(x).float().cpu().numpy()
                    row["torch_vs_fp32"] = compare(torch_out, ref)
                    for mode, cg in (("ort_cuda", False), ("ort_cuda_graph", True)):
                        try:
                            runner, out = ort_runner(by_key[key]["path"], x, cg)
                            row[f"{mode}_ms"] = measure(runner, batch, warmup=5, repeats=30)["latency_ms_median"]
                            row[f"{mode}_vs_fp32"] = compare(out.float().cpu().numpy(), ref)
                        except Exception as e:  # noqa: BLE001 -- a benchmark row records why a mode did not run
                            row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    if batch == 1:
                        row["ort_cpu_vs_fp32"] = compare(cpu_logits(by_key[key]["path"], x), ref)
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
                del graphed
                torch.cuda.empty_cache()
    loop_key = f"{args.models[0]}_plain_fp32_b1_loop"
    if loop_key in by_key:
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(dev)
        try:
            runner, out = ort_runner(by_key[loop_key]["path"], x, False)
            results["loop_form"] = {"key": loop_key, "ort_cuda_ms": measure(runner, 1, warmup=2, repeats=5)["latency_ms_median"],
                                    "nodes": by_key[loop_key]["nodes"]}
        except Exception as e:  # noqa: BLE001
            results["loop_form"] = {"key": loop_key, "error": f"{type(e).__name__}: {e}"[:300]}
        save()


def cpu_smoke(args, exports: list[dict], results: dict, save) -> None:
    """Parity of the exported files on the CPU provider (no GPU): checks this script's plumbing."""
    for e in exports:
        x = torch.randn(e["batch"], 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = build(e["model"], e["recipe"])(x).numpy()
        results["rows"].append({"key": e["key"], "ort_cpu_vs_fp32": compare(cpu_logits(e["path"], x.to(DTYPES[e["dtype"]])), ref)})
        save()


def markdown(results: dict) -> str:
    rows = ["| model | dtype | batch | export | nodes (per block) | torch eager | torch graph | ORT CUDA | ORT CUDA graph | "
            "ORT graph / torch graph | max rel. diff (ORT CUDA vs torch fp32; CPU provider) | top-1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        if "torch_graph_ms" not in r:
            continue
        best = min(v for v in (r.get("ort_cuda_ms"), r.get("ort_cuda_graph_ms")) if v is not None) if (r.get("ort_cuda_ms") or r.get("ort_cuda_graph_ms")) else None
        fmt = lambda v: f"{v:.2f} ms" if v is not None else "—"  # noqa: E731
        par = r.get("ort_cuda_graph_vs_fp32") or r.get("ort_cuda_vs_fp32") or {}
        cpu = r.get("ort_cpu_vs_fp32", {}).get("max_rel")
        rows.append("| " + " | ".join([
            f"{r['model']} {r['recipe']}", r["dtype"], str(r["batch"]), f"{r['export_s']:.0f} s",
            f"{r['nodes']:,} ({r['nodes_per_block']:.0f})", fmt(r["torch_eager_ms"]), fmt(r["torch_graph_ms"]),
            fmt(r.get("ort_cuda_ms")), fmt(r.get("ort_cuda_graph_ms")),
            f"x{best / r['torch_graph_ms']:.1f}" if best else "—",
            (f"{par['max_rel']:.1e}" if par else "—") + (f"; {cpu:.1e}" if cpu is not None else ""),
            f"{par['top1']:.0%}" if par else "—"]) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vim_tiny", "vim_small"])
    p.add_argument("--recipe", default="r031")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], choices=list(DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True, help="also time the loop form (Vim-Ti fp32 b1)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="parallel export processes")
    p.add_argument("--budget-s", type=float, default=330, help="stop starting new GPU timings after this many seconds")
    p.add_argument("--work", type=Path, default=Path("/tmp/rmeeto_onnx_gpu"))
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--export-only", action="store_true", help="write the exports into --work and stop (no GPU needed)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cpu_smoke:
        args.models, args.batches, args.loop = ["vim_test"], [1, 2], False
    args.work.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    from compressor.export import _runtime

    results = {"versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__},
               "providers": list(_runtime.providers()), "preload": _runtime.preload_note() or "ok", "notes": [], "rows": []}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.out.write_text(json.dumps(results, indent=2, default=str))

    save()
    print(f"onnxruntime {ort.__version__} from {ort.__file__}; providers {results['providers']}; preload {results['preload']}", flush=True)
    t0 = time.time()
    results["exports"] = export_all(args, args.work)
    results["export_wall_s"] = time.time() - t0
    save()
    if args.export_only:
        print(f"exported into {args.work} in {results['export_wall_s']:.0f} s")
        return
    if args.cpu_smoke:
        cpu_smoke(args, results["exports"], results, save)
    else:
        if not _runtime.cuda_available():
            results["notes"].append("the CUDA execution provider is not available: " + (_runtime.install_note() or "is onnxruntime-gpu first on PYTHONPATH?"))
            save()
            raise SystemExit(results["notes"][-1])
        time_all(args, results["exports"], results, save)
    save()
    print(markdown(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
