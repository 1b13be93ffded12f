"""CPU throughput of the model that re-training runs: eval forward and forward + backward,
images/s per (threads, batch, op backend), and the memory of a real re-training step.

Throughput (default): the model in ``CKPT`` on random 224 px images; ``eval`` = forward under
``no_grad`` (what ``rmeeto eval`` and the teacher do), ``train`` = forward + backward of a
cross-entropy loss (the student's share of a step). Median of ``--repeats`` timed runs after
one warm-up; wall time and this process's CPU time are both reported, with the load average,
because on a shared machine the wall time depends on the other work.

    python benchmarks/bench_cpu_retrain.py CKPT --out benchmarks/results/cpu_retrain_after.json
    # the same measurement of another checkout (e.g. a worktree of an older commit):
    python benchmarks/bench_cpu_retrain.py CKPT --repo ../old --label before --out ...

Memory (``--memory``): for each batch, a fresh process builds the engine's real step (student
converted with ``--recipe``, teacher, AdamW, Mixup, distillation) and runs two steps; it reports
the peak resident memory the steps added and what :mod:`compressor.engine._memory` estimated
before them (the check that fits the batch to the machine).

    python benchmarks/bench_cpu_retrain.py CKPT --memory --batches 8,16,32,64
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--backends", default="auto", help="comma-separated op backends (auto, ref, chunked)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="a configuration whose warm-up run took longer is timed once (its warm-up)")
    p.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose compressor package is measured")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. before / after)")
    p.add_argument("--memory", action="store_true", help="measure the memory of real re-training steps instead")
    p.add_argument("--recipe", default="r031", help="--memory: the recipe of the student")
    p.add_argument("--memory-one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _import(repo: Path):
    sys.path.insert(0, str(repo))
    import torch

    compressor = importlib.import_module("compressor")
    return torch, compressor


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except Exception:  # no lscpu
        return platform.processor() or platform.machine()


def _time(fn, repeats: int, max_seconds: float) -> dict:
    """Warm-up, then ``repeats`` timed calls: wall and process-CPU seconds of each."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    walls, cpus = [time.perf_counter() - t0], [time.process_time() - c0]
    if walls[0] > max_seconds:
        return {"wall_s": walls, "cpu_s": cpus, "timed_warmup_only": True}
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": walls, "cpu_s": cpus, "timed_warmup_only": False}


def throughput(args) -> dict:
    torch, compressor = _import(args.repo)
    from compressor import load_model, set_backend

    model = load_model(args.ckpt)
    cfg = model.cfg
    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in map(int, args.batches.split(",")):
            images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
            labels = torch.randint(0, cfg.num_classes, (batch,))
            for backend in args.backends.split(","):
                set_backend(model, backend)
                for mode in args.modes.split(","):
                    load = os.getloadavg()[0]
                    if mode == "eval":
                        model.eval()

                        def step():
                            with torch.no_grad():
                                model(images)
                    else:
                        model.train()

                        def step():
                            model.zero_grad(set_to_none=True)
                            torch.nn.functional.cross_entropy(model(images), labels).backward()
                    r = _time(step, args.repeats, args.max_seconds)
                    wall, cpu = statistics.median(r["wall_s"]), statistics.median(r["cpu_s"])
                    row = {"threads": threads, "batch": batch, "backend": backend, "mode": mode,
                           "images_per_s": batch / wall, "cpu_s_per_image": cpu / batch, "load_avg_1min": load, **r}
                    rows.append(row)
                    print(f"threads {threads} batch {batch:3d} {backend:8s} {mode:5s}: {row['images_per_s']:6.2f} img/s "
                          f"(wall {wall:.2f} s, cpu {cpu:.2f} s, load {load:.1f})", flush=True)
    return {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "model": args.ckpt.name, "config": cfg.to_dict(), "label": args.label, "results": rows}


def memory_one(args) -> dict:
    """One process, one batch: peak RSS added by two real re-training steps, and the estimate."""
    torch, compressor = _import(args.repo)
    from compressor.engine._build import amp_settings, build_optimizer, build_scheduler, make_student, prepare_teacher
    from compressor.engine._memory import probe_step_memory
    from compressor.engine._state import TrainState
    from compressor.engine.data import build_mixup
    from compressor.engine.distributed import Dist
    from compressor.engine.loop import train_step
    from compressor.engine.loss import build_criterion
    from compressor import load_model
    from compressor.recipes import load_recipe, with_overrides

    torch.set_num_threads(1)
    b = args.memory_one
    device = torch.device("cpu")
    teacher = load_model(args.ckpt)
    recipe = with_overrides(load_recipe(args.recipe), batch_size=b)
    rt = recipe.retrain
    student = make_student(teacher, recipe)
    teacher = prepare_teacher(teacher, device)
    mem = probe_step_memory(student, student.layout.input_shape, device, amp_settings(rt.amp, device)[0])
    mixup = build_mixup(rt, teacher.cfg.num_classes)
    opt = build_optimizer(student, rt.lr, rt.weight_decay)
    state = TrainState(model=student, student=student, teacher=teacher, criterion=build_criterion(rt, mixup is not None, True),
                       optimizer=opt, scheduler=build_scheduler(opt, rt, 4), dist=Dist(device=device), mixup=mixup)
    cfg = teacher.cfg
    x = torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (b,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        train_step(state, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batch": b, "rss_before_gb": before / 1e9, "rss_peak_gb": peak / 1e9, "step_gb": (peak - before) / 1e9,
            "estimate_gb": mem.at(b) / 1e9, "per_image_mb": mem.per_image / 1e6, "fixed_mb": mem.fixed / 1e6}


def memory(args) -> dict:
    rows = []
    for b in map(int, args.batches.split(",")):
        cmd = [sys.executable, __file__, str(args.ckpt), "--memory-one", str(b), "--recipe", args.recipe, "--repo", str(args.repo)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"batch {b} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"batch {b:3d}: step added {row['step_gb']:.2f} GB (peak RSS {row['rss_peak_gb']:.2f} GB), "
              f"estimated {row['estimate_gb']:.2f} GB", flush=True)
    return {"cpu": _cpu_name(), "model": args.ckpt.name, "recipe": args.recipe, "label": args.label, "memory": rows}


def main(argv=None) -> None:
    args = _args(argv)
    if args.memory_one is not None:
        print(json.dumps(memory_one(args)))
        return
    report = memory(args) if args.memory else throughput(args)
    if args.out:
        sys.path.insert(0, str(HERE.parent))
        from compressor._io import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
