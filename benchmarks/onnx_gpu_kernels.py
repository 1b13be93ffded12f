"""Where an exported Vim's time goes on ONNX Runtime's CUDA execution provider: the GPU kernels
it launches, measured on the device (CUPTI, through ``torch.profiler``: the profiler records
every kernel of the process, ONNX Runtime's included), beside PyTorch's own kernels for the
same model.

ONNX Runtime's built-in profiler times CUDA nodes on the host (their launch), so it cannot say
which kernels are slow; this script can. Per export (``--scans`` forms × ``--batches``, fixed
batch, ``--dtype``) it reports: the wall time of one run (IO binding, median), the device time
summed over its kernels, the number of kernels launched per run, and the top kernels by device
time; then the same for PyTorch (the ``triton`` backend, one forward, eager).

Needs ``onnxruntime-gpu`` first on ``PYTHONPATH`` (``benchmarks/onnx_gpu.sh`` shows how it is
installed on a host without network) and a CUDA device:

    python benchmarks/onnx_gpu_kernels.py --model vim_tiny --scans ssd loop --batches 1 128 --out k.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernel_profile import kernel_times, summary  # noqa: E402
from onnx_cpu import write_results  # noqa: E402
from onnx_gpu import build, export_key, ort_runner, run_exports  # noqa: E402


def wall_ms(runner, batch: int) -> float:
    """Median wall time of one call (``compressor.profile.timing.measure``: 3 warm-up calls, up to
    10 timed ones within about 2 s, at least 3)."""
    from compressor.profile.timing import measure

    return measure(runner, batch, warmup=3, repeats=10, budget_s=2.0, min_repeats=3)["latency_ms_median"]


def show(label: str, row: dict) -> None:
    print(f"{label}: wall {row['wall_ms']:.2f} ms, device {row['device_ms']:.2f} ms in {row['launches']:.0f} kernels", flush=True)
    for k in row["top"][:8]:
        print(f"    {k['ms']:9.3f} ms {k['calls']:7.0f}x  {k['kernel'][:100]}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_tiny")
    p.add_argument("--recipe", default=None, help="e.g. r031 (default: the plain model)")
    p.add_argument("--scans", nargs="+", default=["ssd", "loop"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--runs", type=int, default=3, help="profiled runs per export")
    p.add_argument("--work", type=Path, default=Path("/tmp/rmeeto_onnx_gpu"))
    p.add_argument("--workers", type=int, default=4, help="parallel export processes")
    p.add_argument("--export-only", action="store_true", help="write the exports into --work and stop (no GPU needed)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from compressor.export import _runtime
    from compressor.models import set_backend
    from compressor.profile.timing import Runner

    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [dict(key=export_key(args.model, args.recipe, args.dtype, b, scan), model=args.model, recipe=args.recipe,
                 dtype=args.dtype, batch=b, scan=scan, path=str(args.work / (export_key(args.model, args.recipe, args.dtype, b, scan) + ".onnx")))
            for b in args.batches for scan in args.scans]
    exports = {e["key"]: e for e in run_exports(jobs, args.workers)}
    if args.export_only:
        return 0
    _runtime.providers()  # onnxruntime.preload_dlls(): the CUDA libraries of PyTorch's wheels
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args) | {"work": str(args.work),
               "out": str(args.out)}, "rows": []}
    tag = f"{args.model}_{args.recipe or 'plain'}_{args.dtype}"
    results["exports"] = list(exports.values())
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)).to("cuda", dtype)
        for scan in args.scans:
            path = exports[export_key(args.model, args.recipe, args.dtype, batch, scan)]["path"]
            runner, _ = ort_runner(path, x, cuda_graph=False)
            row = dict(what="onnxruntime-cuda", scan=scan, batch=batch, wall_ms=wall_ms(runner, batch),
                       **summary(kernel_times(runner.run, args.runs)))
            results["rows"].append(row)
            show(f"ORT CUDA {tag} {scan} b{batch}", row)
            write_results(args.out, results)
        model = build(args.model, args.recipe).to("cuda", dtype)
        set_backend(model, "triton")
        with torch.inference_mode():
            def fwd():
                return model(x)
            row = dict(what="torch-triton-eager", scan="triton", batch=batch, wall_ms=wall_ms(Runner(fwd, "cuda"), batch),
                       **summary(kernel_times(fwd, args.runs)))
        results["rows"].append(row)
        show(f"torch triton {tag} b{batch}", row)
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
