"""A/B of the re-training step between two source trees (or one tree with a patch), interleaved.

Why: one call of ``bench_retrain`` per commit, one order only, could not tell a regression from
the spread between calls (the same commit measured 569 and 825 img/s in two calls). Here every
variant runs in its own process, the variants take turns for ``--rounds`` rounds (the order
rotated each round), and each reports the median of its repeats; the report gives every round.
``--profile DIR`` adds a torch.profiler trace of a few ``r031`` steps per variant: the top
kernels by GPU time, the top ops by host time, and the GPU-busy share of the step's wall time
(a step whose GPU is busy much less than its wall time is bound by the host's launches).

Variants: ``name=PATH`` or ``name=PATH:PATCH``, PATCH one of
  - ``oldscores``: the merge's scores as before the merge-numerics change (unit-normalised
    metric, the matmul under the caller's autocast, ``argsort`` for the ranking);
  - ``ub2``: the Triton scan's backward issuing the loads of two steps before their stores
    (``TUNING["scan_bwd"]["ub"] = 2``).

GPU (kernels on PYTHONPATH: benchmarks/gpu_env.sh; an older tree unpacked under .gpu/old)::

    python3 benchmarks/retrain_ab_gpu.py --variants new=.,old=.gpu/old,new-oldscores=.:oldscores \\
        --rounds 3 --out $OUT/retrain_ab.json --profile $OUT/prof

CPU smoke run::

    python benchmarks/retrain_ab_gpu.py --variants a=.,b=.:oldscores --model vim_test --batch 2 \\
        --steps 1 --repeats 1 --rounds 1 --out /tmp/ab.json --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", required=True, help="name=PATH[:PATCH],...")
    p.add_argument("--model", default="vim_small")
    p.add_argument("--recipes", default="none,r031")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ops", default="triton")
    p.add_argument("--precision", default=None, help="bf16 on cuda, fp32 on cpu by default")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--profile", default=None, help="folder for the profiler tables (one r031 trace per variant)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per child process")
    p.add_argument("--fresh-cache", action="store_true",
                   help="each child compiles into an empty TRITON_CACHE_DIR (no variant profits from an earlier one's compiles)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _parse(spec: str) -> list[tuple[str, str, str]]:
    out = []
    for item in spec.split(","):
        name, _, rest = item.partition("=")
        path, _, patch = rest.partition(":")
        out.append((name, path, patch))
    return out


# --------------------------------------------------------------------------- child


def _patch_oldscores():
    import torch

    from compressor.merge import bipartite

    def scores(metric, distance):
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, 0::2], metric[:, 1::2]
        if distance == "cosine":
            return a @ b.transpose(1, 2)
        return -torch.cdist(a, b, p=1.0 if distance == "l1" else 2.0)

    bipartite._scores = scores
    bipartite._stable_order = lambda v: v.argsort(dim=-1, descending=True)


def _profile(state, batches, folder: Path, name: str, steps: int = 3) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from compressor.engine.loop import train_step

    cuda = state.device.type == "cuda"
    it = iter(batches)
    for _ in range(2):
        train_step(state, *next(it))
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(state, *next(it))
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    avg = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    gpu_us = sum(getattr(e, "self_device_time_total", 0.0) for e in avg) / steps if cuda else 0.0
    launches = sum(e.count for e in avg if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")) / steps
    ops = sum(e.count for e in avg if e.key.startswith("aten::")) / steps
    folder.mkdir(parents=True, exist_ok=True)
    text = [f"# {name}: {wall * 1e3:.1f} ms wall per step, GPU busy {gpu_us / 1e3:.1f} ms per step, "
            f"{launches:.0f} kernel launches and {ops:.0f} aten ops per step\n",
            avg.table(sort_by=key, row_limit=30), "\n# by host time\n", avg.table(sort_by="self_cpu_time_total", row_limit=30)]
    (folder / f"{name}.txt").write_text("".join(text))
    return {"wall_ms": wall * 1e3, "gpu_busy_ms": gpu_us / 1e3, "launches_per_step": launches, "aten_ops_per_step": ops}


def _compiled_variants() -> dict:
    """How many specialisations of each Triton mixer kernel this process compiled (a launch
    whose argument types or alignments differ from every earlier one compiles a new one)."""
    from compressor.ops import _triton_bimamba

    out = {}
    for name, fn in _triton_bimamba._kernels().items():
        caches = getattr(fn, "device_caches", {})
        out[name] = sum(len(c[0]) for c in caches.values())
    return out


def child(a) -> None:
    name, path, patch = _parse(a.child)[0]
    tree = Path(path).resolve()
    sys.path.insert(0, str(tree))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_retrain", tree / "benchmarks" / "bench_retrain.py")
    br = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(br)
    import compressor

    assert Path(compressor.__file__).resolve().is_relative_to(tree), compressor.__file__
    if patch == "oldscores":
        _patch_oldscores()
    elif patch == "ub2":
        from compressor.ops import _triton_bimamba

        _triton_bimamba.TUNING["scan_bwd"]["ub"] = _triton_bimamba.TUNING["scan_bwd_small"]["ub"] = 2
    elif patch:
        raise SystemExit(f"unknown patch {patch!r}")
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prec = a.precision or ("bf16" if dev == "cuda" else "fp32")
    ns = br._args(["--model", a.model, "--recipes", a.recipes, "--batch", str(a.batch), "--precisions", prec,
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--ops", a.ops,
                   "--device", dev])
    rep = br.run(ns)
    rows = {r["recipe"]: r["images_per_s"] for r in rep["results"]}
    prof = None
    if a.profile:
        from compressor.recipes import load_recipe, with_overrides

        recipe = with_overrides(load_recipe(a.recipes.split(",")[-1]), batch_size=a.batch, epochs=1)
        torch.manual_seed(0)
        state = br._state(a.model, recipe, torch.device(dev), br.PRECISIONS[prec] if dev == "cuda" else None, True, a.ops, 10)
        prof = _profile(state, br._synthetic(state.student.cfg, a.batch, torch.device(dev)), Path(a.profile), name)
    print("RESULT " + json.dumps({"variant": name, "images_per_s": rows, "profile": prof, "device": rep["device"],
                                  "compiled": _compiled_variants()}), flush=True)


# --------------------------------------------------------------------------- parent


def main(argv=None) -> None:
    a = _args(argv)
    if a.child:
        return child(a)
    sys.path.insert(0, str(HERE.parents[1]))  # the report's writer (children import their own tree)
    from compressor._io import atomic_write_text
    variants = _parse(a.variants)
    rounds = []
    for rnd in range(a.rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for name, path, patch in order:
            argv_child = [sys.executable, str(HERE), "--child", f"{name}={path}:{patch}", "--variants", a.variants,
                          "--out", a.out, *(["--profile", a.profile] if a.profile and rnd == 0 else []),
                          "--model", a.model, "--recipes", a.recipes, "--batch", str(a.batch), "--ops", a.ops,
                          "--steps", str(a.steps), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
                          *(["--precision", a.precision] if a.precision else [])]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != HERE.parents[1]))
            if a.fresh_cache:
                env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"triton_{name}_")
            try:
                proc = subprocess.run(argv_child, capture_output=True, text=True, timeout=a.timeout, env=env)
            except subprocess.TimeoutExpired:
                print(f"round {rnd} {name}: timed out", flush=True)
                continue
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"round {rnd} {name}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(line[7:])
            res["round"] = rnd
            rounds.append(res)
            print(f"round {rnd} {name:16s} " + "  ".join(f"{k} {v:7.1f} img/s" for k, v in res["images_per_s"].items())
                  + f"  | compiled {res['compiled']}" + (f"  | profile {res['profile']}" if res["profile"] else ""), flush=True)
            atomic_write_text(a.out, json.dumps({"args": vars(a), "runs": rounds}, indent=2) + "\n")
    print("median over rounds:")
    for name, _, _ in variants:
        mine = [r["images_per_s"] for r in rounds if r["variant"] == name]
        if mine:
            print(f"  {name:16s} " + "  ".join(f"{k} {statistics.median(m[k] for m in mine):7.1f}" for k in mine[0]), flush=True)


if __name__ == "__main__":
    main()
