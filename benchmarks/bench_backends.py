"""Inference throughput of whole Vision Mamba models (or just their block stack) per op backend.

For each model and backend: build (random weights), check the output against the first backend
run, warm up, then time ``--repeats`` forwards (CUDA events on a GPU, perf_counter on a CPU) and
report images/s from the median. Prints a table last and writes everything to ``--out``.

    # GPU (kernels on PYTHONPATH: benchmarks/gpu_env.sh): batch 128, fp16, Vim-Ti/S/B, cuda/chunked/ref
    python benchmarks/bench_backends.py --device cuda --backends cuda,chunked
    # the 24-block stack alone (without patch embedding, norm and head)
    python benchmarks/bench_backends.py --device cuda --blocks-only --backends cuda
    # CPU: vim_tiny, batch 8, fp32, chunked and ref
    python benchmarks/bench_backends.py --device cpu
    # smoke test
    python benchmarks/bench_backends.py --device cpu --models vim_test --batch 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from compressor.errors import BackendUnavailable  # noqa: E402
from compressor.models import create_model, set_backend  # noqa: E402
from compressor.ops import kernels_available  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULTS = {  # per device: what runs when an option is not given
    "cuda": dict(models="vim_tiny,vim_small,vim_base", batch=128, dtype="fp16", backends="cuda,chunked,ref"),
    "cpu": dict(models="vim_tiny", batch=8, dtype="fp32", backends="chunked,ref"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", help="comma-separated registry names (cuda: vim_tiny,vim_small,vim_base; cpu: vim_tiny)")
    p.add_argument("--batch", type=int, help="images per forward (cuda: 128, cpu: 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model and input dtype (cuda: fp16, cpu: fp32); the residual stays fp32")
    p.add_argument("--backends", help="comma-separated, first is the baseline for the diff column (cuda: cuda,chunked,ref; cpu: chunked,ref)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards first")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's, 224 for Vim)")
    p.add_argument("--blocks-only", action="store_true", help="time only the block stack (24 blocks for Vim) on a (B, tokens, D) input")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results.json", help="JSON file with every measurement")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def build(name: str, args, dtype: torch.dtype):
    overrides = {"img_size": args.img_size} if args.img_size else {}
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval().to(device=args.device, dtype=dtype)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    if args.blocks_only:
        x = torch.randn(args.batch, cfg.num_tokens, cfg.embed_dim, generator=g)
    else:
        x = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    return model, x.to(device=args.device, dtype=dtype)


def forward_fn(model, blocks_only: bool):
    if not blocks_only:
        return model

    def blocks(hidden):
        residual = None
        for blk in model.layers:
            hidden, residual = blk(hidden, residual)
        return hidden.float() + residual  # the stream after the last block
    return blocks


def time_forward(fn, x, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per forward, one per repeat, after ``warmup`` untimed forwards."""
    for _ in range(warmup):
        fn(x)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()  # sync point: one per repeat, outside the timed region
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return times


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_model(name: str, args, dtype) -> list[dict]:
    model, x = build(name, args, dtype)
    fn = forward_fn(model, args.blocks_only)
    rows, baseline, baseline_name = [], None, None
    for backend in args.backends.split(","):
        row = dict(model=name, backend=backend, batch=args.batch, dtype=args.dtype, mode="blocks" if args.blocks_only else "model",
                   tokens=model.cfg.num_tokens, depth=model.cfg.depth)
        set_backend(model, backend)
        try:
            with torch.inference_mode():
                out = fn(x)  # correct first: compare with the first backend that ran
                if baseline is None:
                    baseline, baseline_name = out, backend
                row.update(max_rel_diff=rel_diff(out, baseline), diff_vs=baseline_name)
                times = time_forward(fn, x, args.device, args.warmup, args.repeats)
        except BackendUnavailable as e:
            row.update(status="skipped", reason=str(e))
            print(f"  {name:<12} {backend:<8} skipped: {e}", flush=True)
            rows.append(row)
            continue
        med = statistics.median(times)
        row.update(status="ok", median_ms=med * 1e3, images_per_s=args.batch / med, times_ms=[t * 1e3 for t in times])
        print(f"  {name:<12} {backend:<8} {fmt_rate(row['images_per_s'])} im/s  {row['median_ms']:9.2f} ms  diff {row['max_rel_diff']:.1e}", flush=True)
        rows.append(row)
    del model, x, baseline
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def fmt_rate(v: float) -> str:
    return f"{v:10.1f}" if v >= 10 else f"{v:10.3f}"


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print(f"{'model':<12} {'backend':<8} {'im/s':>10} {'ms/batch':>10} {'x vs first':>10} {'max rel diff vs first':>22}")
    first: dict[str, float] = {}
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:<12} {r['backend']:<8} {'skipped':>10}")
            continue
        base = first.setdefault(r["model"], r["images_per_s"])
        print(f"{r['model']:<12} {r['backend']:<8} {fmt_rate(r['images_per_s'])} {r['median_ms']:10.2f} "
              f"{r['images_per_s'] / base:10.2f} {r['max_rel_diff']:22.1e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    dev = device_name(args.device)
    if args.device == "cpu" and hasattr(os, "getloadavg"):  # CPU timings on a shared machine are noisy
        dev += f", load average {os.getloadavg()[0]:.1f} at start"
    what = "block stack only" if args.blocks_only else "whole model"
    header = (f"{what}, batch {args.batch}, {args.dtype}, median of {args.repeats} after {args.warmup} warm-up, "
              f"on {dev}, torch {torch.__version__}")
    print(header, flush=True)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, dtype)
    print_table(rows, header)
    result = dict(device=dev, torch=torch.__version__, kernels=kernels_available(), args=vars(args), results=rows)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
