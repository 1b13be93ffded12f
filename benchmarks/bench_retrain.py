"""Throughput of R-MeeTo re-training steps on one device: merged student forward + backward,
unmerged teacher forward (no grad), CE + 0.5·KL, AdamW — the engine's own ``train_step``.

Synthetic mode (default): random images already on the device, so no data loader limits it;
one row per recipe (``none`` = the unmerged student, the baseline measured in the same run) ×
precision (``bf16`` autocast, ``fp32``, optionally ``fp16`` + GradScaler). ``--data DIR`` adds
rows that run through the real training loader (ImageFolder ``DIR/train``, the recipe's DeiT
augmentation, ``--workers`` processes): the loader alone (decode + augment + copy to the
device) and the full step fed by it, to see where the loader becomes the limit.

GPU (kernels on PYTHONPATH: benchmarks/gpu_env.sh)::

    python benchmarks/bench_retrain.py --out benchmarks/results/retrain_h100.json
    python benchmarks/bench_retrain.py --data /tmp/cifar10 --workers 16 --out /tmp/retrain_data.json

CPU smoke run::

    python benchmarks/bench_retrain.py --model vim_test --device cpu --batch 4 --steps 3 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import ops  # noqa: E402
from compressor._io import atomic_write_text  # noqa: E402
from compressor.engine import make_student  # noqa: E402
from compressor.engine._build import build_optimizer, build_scheduler, prepare_teacher  # noqa: E402
from compressor.engine._state import TrainState  # noqa: E402
from compressor.engine.data import build_mixup, build_train_loader, check_data_dir  # noqa: E402
from compressor.engine.distributed import Dist, resolve_device  # noqa: E402
from compressor.engine.loop import train_step  # noqa: E402
from compressor.engine.loss import build_criterion  # noqa: E402
from compressor.models import create_model, set_backend  # noqa: E402
from compressor.recipes import load_recipe, with_overrides  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_small")
    p.add_argument("--recipes", default="none,r031", help="comma-separated; none = unmerged student (baseline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128, help="images per step (one GPU)")
    p.add_argument("--precisions", default=None, help="bf16,fp32 on cuda (default), fp32 on cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=None, help="5 on cuda, 1 on cpu by default")
    p.add_argument("--repeats", type=int, default=3, help="median over repeats")
    p.add_argument("--no-distill", action="store_true", help="student only (no teacher forward)")
    p.add_argument("--ops", default="auto", help="op backend: auto = mamba-ssm/causal-conv1d kernels when present")
    p.add_argument("--data", default=None, help="ImageFolder DIR (train/ + val/): also time the real loader")
    p.add_argument("--workers", type=int, default=8, help="loader workers for --data")
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state(model_name: str, recipe, device, amp_dtype, distill: bool, ops_backend: str, steps: int) -> TrainState:
    teacher = set_backend(create_model(model_name), ops_backend)
    student = set_backend(make_student(teacher, recipe), ops_backend).to(device)
    rt = recipe.retrain
    optimizer = build_optimizer(student, rt.lr, rt.weight_decay)
    mixup = build_mixup(rt, teacher.cfg.num_classes)
    return TrainState(
        model=student, student=student, teacher=prepare_teacher(teacher, device) if distill else None,
        criterion=build_criterion(rt, mixup is not None, distill), optimizer=optimizer,
        scheduler=build_scheduler(optimizer, rt, steps), dist=Dist(device=device), mixup=mixup,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None, amp_dtype=amp_dtype,
        epochs=1,
    )


def _time_steps(state: TrainState, batches, steps: int, warmup: int, repeats: int, batch: int) -> dict:
    """Median images/s over ``repeats`` runs of ``steps`` steps (after ``warmup`` steps)."""
    device = state.device
    it = iter(batches)
    for _ in range(warmup):
        train_step(state, *next(it))
    _sync(device)
    rates, losses = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = train_step(state, *next(it))
        _sync(device)
        rates.append(steps * batch / (time.perf_counter() - t0))
        losses.append(float(loss))
    return {"images_per_s": statistics.median(rates), "images_per_s_all": rates, "ms_per_step": 1e3 * batch / statistics.median(rates),
            "last_loss": losses[-1], "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses))}


def _synthetic(cfg, batch: int, device):
    """The same random batch forever (already on the device): no loader cost at all."""
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    while True:
        yield x, y


def _forever(loader):
    while True:
        yield from loader


def _loader_only(loader, device, steps: int, warmup: int, batch: int) -> dict:
    it = _forever(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    _sync(device)
    return {"images_per_s": steps * batch / (time.perf_counter() - t0)}


def _max_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run(args) -> dict:
    device = resolve_device(args.device)
    precisions = (args.precisions or ("bf16,fp32" if device.type == "cuda" else "fp32")).split(",")
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    loader = None
    results = []
    for name in args.recipes.split(","):
        recipe = with_overrides(load_recipe(name), batch_size=args.batch, epochs=1)
        for prec in precisions:
            if prec not in PRECISIONS:
                raise SystemExit(f"unknown precision {prec!r}: choose from {', '.join(PRECISIONS)}")
            amp = PRECISIONS[prec] if device.type == "cuda" else None
            torch.manual_seed(0)
            total = warmup + args.repeats * args.steps
            state = _state(args.model, recipe, device, amp, not args.no_distill, args.ops, total)
            cfg = state.student.cfg
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = {"recipe": name, "precision": prec, "input": "synthetic",
                   **_time_steps(state, _synthetic(cfg, args.batch, device), args.steps, warmup, args.repeats, args.batch),
                   "max_memory_gib": _max_memory(device)}
            results.append(row)
            if args.data:
                if loader is None:
                    spec = check_data_dir(args.data)
                    loader = build_train_loader(spec, cfg.img_size, recipe.retrain, batch_size=args.batch,
                                                num_workers=args.workers, pin_memory=device.type == "cuda")
                    results.append({"recipe": "-", "precision": "-", "input": f"loader only ({args.workers} workers)",
                                    **_loader_only(loader, device, args.steps * args.repeats, warmup, args.batch)})
                results.append({"recipe": name, "precision": prec, "input": f"loader ({args.workers} workers)",
                                **_time_steps(state, _forever(loader), args.steps, warmup, args.repeats, args.batch)})
            del state
    base = {r["precision"]: r["images_per_s"] for r in results if r["recipe"] == "none" and r["input"] == "synthetic"}
    for r in results:
        if r["input"] == "synthetic" and r["precision"] in base:
            r["speedup_vs_none"] = r["images_per_s"] / base[r["precision"]]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "kernels": ops.kernels_available(), "ops_backend": args.ops,
        "model": args.model, "batch": args.batch, "steps": args.steps, "warmup": warmup, "repeats": args.repeats,
        "distill": not args.no_distill, "results": results,
    }


def print_table(report: dict, console: Console) -> None:
    table = Table(title=f"re-training step, {report['model']}, batch {report['batch']}, {report['device']}")
    for col in ("recipe", "precision", "input", "images/s", "ms/step", "vs none", "GiB"):
        table.add_column(col, justify="left" if col in ("recipe", "precision", "input") else "right")
    for r in report["results"]:
        table.add_row(
            r["recipe"], r["precision"], r["input"], f"{r['images_per_s']:.1f}",
            f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "-",
            f"x{r['speedup_vs_none']:.2f}" if "speedup_vs_none" in r else "-",
            f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") else "-",
        )
    console.print(table)


def main(argv=None) -> None:
    args = _args(argv)
    report = run(args)
    print_table(report, Console())
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
