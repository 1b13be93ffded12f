"""``run_demo(out)``: the whole R-MeeTo pipeline on the CPU in a couple of minutes, no files needed.

1. build a tiny Vision Mamba (registry ``vim_demo``; ``vim_test`` for ``size="tiny"``);
2. generate a small learnable ImageFolder dataset under ``OUT/data`` (unless ``data`` is given);
3. train the base model briefly (:func:`compressor.engine.fit`, recipe ``none``, no distillation)
   and save it in the official layout ``{'model': state_dict, 'args': Namespace}`` at ``OUT/base.pth``;
4. compress it with recipe ``smoke`` and re-train one epoch with distillation
   (:func:`compressor.compress.compress`, as ``rmeeto compress``) into ``OUT/compressed/``;
5. export the compressed model to ONNX with the parity check (``OUT/compressed.onnx``);
6. profile baseline vs compressed on the CPU with accuracy on the val split (``OUT/profile/``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from .errors import RmeetoError

__all__ = ["run_demo", "make_synthetic_data", "SIZES"]

#: per size: model, images per class (train, val), base-training epochs, batch size, base lr (for 512)
#: ``vim_demo`` runs at patch 8 (17 tokens, not 65): the pure-PyTorch CPU scan's backward grows
#: quadratically with the sequence length, and 65 tokens cost ~9x more per training step.
SIZES = {
    "small": dict(model="vim_demo", overrides=dict(patch_size=8, stride=8), train=40, val=10, epochs=8, batch_size=32, lr=3.2e-2),
    "tiny": dict(model="vim_test", overrides={}, train=20, val=6, epochs=8, batch_size=16, lr=6.4e-2),
}
NUM_CLASSES = 10
IMG = 32
COMPRESS_RECIPE = "smoke"


# --------------------------------------------------------------------------------------------
# data


def _class_image(c: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB uint8 image of class ``c``: a class-specific pattern in a class-specific
    colour, at a random phase/offset, on a random dark background, with noise."""
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float32)
    ph = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(11, 21, size=2)
    r = np.hypot(xx - cx, yy - cy)
    size = rng.uniform(6, 10)
    k = c % 10
    if k == 0:
        mask = np.sin(yy * 0.8 + ph) > 0  # horizontal stripes
    elif k == 1:
        mask = np.sin(xx * 0.8 + ph) > 0  # vertical stripes
    elif k == 2:
        mask = np.sin((xx + yy) * 0.55 + ph) > 0  # diagonal stripes
    elif k == 3:
        mask = (np.sin(xx * 0.8 + ph) > 0) ^ (np.sin(yy * 0.8 + ph) > 0)  # checkerboard
    elif k == 4:
        mask = r < size  # disc
    elif k == 5:
        mask = (np.abs(xx - cx) < size) & (np.abs(yy - cy) < size)  # square
    elif k == 6:
        mask = (np.abs(xx - cx) < 2.5) | (np.abs(yy - cy) < 2.5)  # cross
    elif k == 7:
        mask = (r > size - 2.5) & (r < size + 1)  # ring
    elif k == 8:
        mask = (yy - cy + size > 0) & (np.abs(xx - cx) < (yy - cy + size) * 0.6) & (yy < cy + size)  # triangle
    else:
        mask = (np.sin(xx * 1.1 + ph) > 0.5) & (np.sin(yy * 1.1 + ph) > 0.5)  # dots
    hue = 2 * math.pi * c / NUM_CLASSES
    colour = 0.55 + 0.45 * np.array([math.cos(hue), math.cos(hue - 2.1), math.cos(hue + 2.1)], dtype=np.float32)
    bg = rng.uniform(0.0, 0.25, size=3).astype(np.float32)
    img = np.where(mask[..., None], colour * rng.uniform(0.8, 1.0), bg)
    img = img + rng.normal(0, 0.08, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_synthetic_data(root: str | os.PathLike, *, train_per_class: int = 40, val_per_class: int = 10,
                        num_classes: int = NUM_CLASSES, seed: int = 0) -> Path:
    """Write ``root/{train,val}/class_NN/*.png`` (32x32) and return ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_class_image(c, rng)).save(d / f"{i:03d}.png")
    return root


# --------------------------------------------------------------------------------------------
# the pipeline


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise RmeetoError(f"{out} exists and is not a directory: choose another -o/--out")
    if out.is_dir() and any(out.iterdir()):
        raise RmeetoError(f"{out} already exists and is not empty: choose another -o/--out (e.g. a new folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RmeetoError(f"cannot create {out} ({e.strerror or e}): choose a writable -o/--out") from None
    return out


def _timing(entry: dict, bs: int) -> float | None:
    for r in entry.get("timings", []):
        if r["batch_size"] == bs and r["backend"] == "eager" and r["status"] == "ok":
            return r["latency_ms_median"]
    return None


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def run_demo(out: str | os.PathLike, *, data: str | os.PathLike | None = None, size: str = "small",
             epochs: int | None = None, console: Console | None = None) -> dict:
    """Run the demo into the new (or empty) folder ``out``; returns a dict with the paths written
    (``base``, ``compressed``, ``onnx``, ``report``, ``data``), the accuracies, the profile rows and
    the wall time per stage. ``data``: an ImageFolder (``train/`` + ``val/``) to use instead of the
    generated one; ``size``: ``small`` or ``tiny``; ``epochs``: base-training epochs."""
    from .compress import compress
    from .engine import fit
    from .export.onnx import export_onnx
    from .loading import load_model
    from .models.registry import create_model
    from .profile.run import run_profile
    from .recipes import load_recipe, with_overrides

    console = console or Console()
    if size not in SIZES:
        raise RmeetoError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if epochs is not None and epochs < 1:
        raise RmeetoError(f"epochs must be >= 1, got {epochs}")
    spec = SIZES[size]
    epochs = epochs or spec["epochs"]
    out = Path(out)
    if data is not None:
        from .engine.data import check_data_dir

        check_data_dir(data, num_classes=NUM_CLASSES)  # fail before creating anything
    out = _check_out(out)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread: these models are op-overhead bound (tiny matmuls, a sequential scan); more
    # threads only add synchronisation, and on a busy machine OpenMP spinning makes it 10x+ slower
    torch.set_num_threads(1)
    try:
        # 1 + 2: model and data
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = create_model(spec["model"], **spec["overrides"]).eval()
        if data is None:
            data = make_synthetic_data(out / "data", train_per_class=spec["train"], val_per_class=spec["val"])
            console.print(f"[bold]1/5[/bold] generated {NUM_CLASSES} classes x {spec['train']} train + {spec['val']} val "
                          f"images in {data}", highlight=False)
        data = Path(data)
        times["data"] = time.perf_counter() - t0

        # 3: base training (recipe none: no merges, no distillation)
        t0 = time.perf_counter()
        base_recipe = with_overrides(
            load_recipe("none"), name="demo-base", description="rmeeto demo: train the base model",
            epochs=epochs, batch_size=spec["batch_size"], lr=spec["lr"], min_lr=1e-5, warmup_epochs=0, distill=False,
            smoothing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0, auto_augment="", color_jitter=0.0, reprob=0.0,
            amp="off", num_workers=0, weight_decay=0.01, eval_crop_pct=1.0,
        )
        console.print(f"[bold]2/5[/bold] training the base model {spec['model']} ({epochs} epoch(s))", highlight=False)
        base_run = fit(None, model, base_recipe, data, out / "base-run", device="cpu", no_aug=True, log_every=5,
                       console=console)
        base_path = out / "base.pth"
        sd = {k: v.detach().cpu() for k, v in base_run.model.state_dict().items()}
        args = argparse.Namespace(model=spec["model"], input_size=IMG, nb_classes=NUM_CLASSES, epochs=epochs,
                                  batch_size=spec["batch_size"], data_path=str(data))
        torch.save({"model": sd, "args": args}, base_path)
        times["train_base"] = time.perf_counter() - t0

        # 4: compress + re-train 1 epoch with distillation
        t0 = time.perf_counter()
        recipe = with_overrides(load_recipe(COMPRESS_RECIPE), num_prune=2, eval_crop_pct=1.0, distill=True)
        console.print(f"[bold]3/5[/bold] compressing with recipe {recipe.name} (num_prune 2) and re-training 1 epoch "
                      "with distillation", highlight=False)
        comp_dir = out / "compressed"
        comp_path = compress(base_path, recipe, comp_dir, retrain_epochs=1, data=data, console=console, device="cpu",
                             lr=spec["lr"] / 4, no_aug=True, log_every=5)
        times["compress"] = time.perf_counter() - t0

        # 5: ONNX export with parity check
        t0 = time.perf_counter()
        console.print("[bold]4/5[/bold] exporting the compressed model to ONNX (with parity check)", highlight=False)
        gm = load_model(comp_path)
        onnx_path = out / "compressed.onnx"
        onnx_report = export_onnx(gm, onnx_path, dynamic_batch=True)
        times["onnx"] = time.perf_counter() - t0

        # 6: profile baseline vs compressed
        t0 = time.perf_counter()
        console.print("[bold]5/5[/bold] profiling baseline vs compressed on the CPU", highlight=False)
        prof_dir = out / "profile"
        report = run_profile(comp_path, out_dir=prof_dir, baseline=base_path, data=data, device="cpu",
                             batch_sizes=(1, 8), backends=("eager",), warmup=2, repeats=5, overhead=(), ops="ref",
                             eval_workers=0, eval_batch_size=64, crop_pct=1.0)
        times["profile"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    times["total"] = time.perf_counter() - t_all

    retrain = getattr(gm, "extra", None) or {}
    retrain = retrain.get("retrain") or {}
    base_entry, comp_entry = report["models"][0], report["models"][1]
    acc = {
        "original": (base_entry.get("accuracy") or {}).get("top1"),
        "training_free": (retrain.get("baseline") or {}).get("training_free", {}).get("top1"),
        "retrained": (comp_entry.get("accuracy") or {}).get("top1"),
    }
    result = {
        "out": str(out), "data": str(data), "base": str(base_path), "compressed": str(comp_path),
        "onnx": str(onnx_path), "report": str(prof_dir / "report.json"), "report_md": str(prof_dir / "report.md"),
        "accuracy": acc, "onnx_parity": onnx_report.to_dict(), "times": times,
        "profile": {e["name"]: {"tokens": e["tokens_per_layer"][-1] if e["tokens_per_layer"] else e["arch"]["tokens"],
                                "gflops": e["flops"]["gflops"], "latency_ms_bs1": _timing(e, 1),
                                "latency_ms_bs8": _timing(e, 8)} for e in report["models"]},
    }
    _print_result(console, result, base_entry, comp_entry, onnx_report, recipe.name)
    return result


def _print_result(console: Console, r: dict, base: dict, comp: dict, onnx_report, recipe_name: str) -> None:
    console.print()
    console.print("[bold]wrote[/bold]", highlight=False)
    for label, key in (("data", "data"), ("base checkpoint", "base"), ("compressed", "compressed"), ("ONNX", "onnx"),
                       ("profile report", "report"), ("profile summary", "report_md")):
        console.print(f"  {label:<16} {r[key]}", highlight=False, soft_wrap=True)
    acc = r["accuracy"]
    tokens = lambda e: f"{e['arch']['tokens']} -> {e['tokens_per_layer'][-1]}" if e["merges"] else str(e["arch"]["tokens"])  # noqa: E731
    parity = (f"rel {onnx_report.max_rel_diff:.0e}, top-1 {100 * onnx_report.top1_agreement:.0f}%"
              if onnx_report.max_rel_diff is not None else "-")
    table = Table(title=f"rmeeto demo: recipe {recipe_name}, val accuracy, CPU latency (fp32, eager, 1 thread)", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("model", "left"), ("top-1", "right"), ("tokens", "right"), ("GFLOPs", "right"),
                      ("ms bs1", "right"), ("ms bs8", "right"), ("ONNX parity", "left")):
        table.add_column(col, justify=just, no_wrap=col in ("model", "tokens"))
    gf = lambda e: f"{e['flops']['gflops']:.4f}"  # noqa: E731
    table.add_row("original", _pct(acc["original"]), tokens(base), gf(base), _ms(_timing(base, 1)), _ms(_timing(base, 8)), "")
    table.add_row("training-free", _pct(acc["training_free"]), tokens(comp), gf(comp), _ms(_timing(comp, 1)),
                  _ms(_timing(comp, 8)), "")
    table.add_row("re-trained", _pct(acc["retrained"]), tokens(comp), gf(comp), _ms(_timing(comp, 1)),
                  _ms(_timing(comp, 8)), parity)
    t = r["times"]
    table.caption = (f"wall time {t['total']:.0f}s (data {t['data']:.0f}s, base training {t['train_base']:.0f}s, "
                     f"compress+re-train {t['compress']:.0f}s, ONNX {t['onnx']:.0f}s, profile {t['profile']:.0f}s)")
    console.print(table)
