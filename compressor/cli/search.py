"""``rmeeto search CKPT --target-speedup 1.35 --batch-size 128 -o found.toml``: the merge schedule
that meets a measured speed target on this device with the least change to the predictions."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import RmeetoError
from ..search.quality import OBJECTIVES
from ..search.run import SearchSettings, run_search
from ._app import command, console
from .profile import Device, DType, Family, MergeImpl, OpBackend, _csv

Objective = Enum("Objective", {o: o for o in OBJECTIVES}, type=str)

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"1.5h"`` or plain seconds (``"600"``) → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise RmeetoError(f"--time-budget must be a duration like 90s, 10m or 1h, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _summary(report: dict) -> Table:
    table = Table(title=f"{report['model']['name']} · {report['hardware']['device_name']} · batch "
                        f"{report['settings']['batch_size']} · {report['settings']['dtype']} · {report['timing_backend']}")
    for col in ("schedule", "{layer: tokens}", "speed-up", "agreement", "KL", "top-1"):
        table.add_column(col, justify="left" if col in ("schedule", "{layer: tokens}") else "right")
    rows = [("found", report["best"])] if report["best"] else []
    rows += [(cmp["recipe"], report["candidates"][cmp["index"]]) for cmp in report["comparisons"]]
    for name, c in rows:
        q = c["quality"]
        speed = c["measured_speedup"] if c["measured_speedup"] is not None else c["predicted_speedup"]
        table.add_row(name, c["schedule_text"], f"x{speed:.3f}", f"{q['agreement']:.1%}", f"{q['kl']:.4f}",
                      "-" if q["top1"] is None else f"{q['top1']:.1%}", style="bold" if name == "found" else None)
    return table


@command()
def search(
    ckpt: Annotated[Optional[Path], typer.Argument(metavar="[CKPT]", help="Official or compressed checkpoint.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="The found recipe (.toml); the report goes to <stem>_report/ beside it.")] = Path("found.toml"),
    target_speedup: Annotated[Optional[float], typer.Option(help="Speed-up over the plain model at --batch-size, e.g. 1.35.", show_default=False)] = None,
    target_latency_ms: Annotated[Optional[float], typer.Option(help="Median ms per forward of --batch-size images, e.g. 8.", show_default=False)] = None,
    target_recipe: Annotated[Optional[str], typer.Option(help="As fast as this recipe (name or .toml), measured here.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size the speed is measured at.", min=1)] = 128,
    model: Annotated[Optional[str], typer.Option(help="Registry model with random weights instead of CKPT (speed only).", show_default=False)] = None,
    family: Annotated[Optional[Family], typer.Option(help="Model family of an official checkpoint.", show_default=False)] = None,
    device: Annotated[Optional[Device], typer.Option(help="Where to time and score (default: cuda if available).", show_default=False)] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="Timing precision (default: fp16 on cuda, fp32 on cpu); scoring is fp32.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="ImageFolder (DIR/val, DIR/test or DIR) for the calibration images; without it, generated images.", show_default=False)] = None,
    num_images: Annotated[int, typer.Option(help="Calibration images.", min=1)] = 512,
    eval_batch_size: Annotated[int, typer.Option(help="Batch size of the scoring forwards.", min=1)] = 64,
    time_budget: Annotated[str, typer.Option(help="Wall-clock budget of the whole search: 90s, 10m, 1h.")] = "10m",
    max_evals: Annotated[Optional[int], typer.Option(help="Stop after this many scored schedules (reproducible runs).", min=1, show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the search and of the calibration subset.", min=0)] = 0,
    objective: Annotated[Optional[Objective], typer.Option(help="What to maximise (default: top1 with labelled --data, else agreement).", show_default=False)] = None,
    compare: Annotated[Optional[str], typer.Option(help="Comma-separated recipes to time, score and mark ('none' for none; default r014,r028,r031,r042,r056).", show_default=False)] = None,
    base_recipe: Annotated[Optional[str], typer.Option(help="Recipe whose [retrain] table and merge mode the found recipe keeps.", show_default=False)] = None,
    margin: Annotated[float, typer.Option(help="Safety margin on the target (0.01: aim 1% faster).", min=0.0, max=0.5)] = 0.01,
    confirm: Annotated[int, typer.Option(help="Finalists timed whole.", min=1)] = 3,
    repeats: Annotated[int, typer.Option(help="Timed calls per whole model.", min=1)] = 30,
    part_repeats: Annotated[int, typer.Option(help="Timed calls per block or merge length.", min=1)] = 10,
    ops_backend: Annotated[OpBackend, typer.Option("--ops", help="Op backend of the scan / conv / norm.")] = OpBackend("auto"),
    merge_impl: Annotated[MergeImpl, typer.Option(help="How merges run: auto (Triton kernels on CUDA), torch, triton.")] = MergeImpl("auto"),
):
    """Find the merge schedule that meets a measured speed target here with the least loss; write
    it as a recipe (rmeeto compress --recipe OUT) and a report with every schedule tried."""
    settings = SearchSettings(
        target_speedup=target_speedup, target_latency_ms=target_latency_ms, target_recipe=target_recipe, batch_size=batch_size,
        device=device.value if device else "auto", dtype=dtype.value if dtype else None, num_images=num_images,
        eval_batch_size=eval_batch_size, time_budget_s=parse_duration(time_budget), max_evals=max_evals, seed=seed,
        objective=objective.value if objective else None, margin=margin, confirm=confirm, repeats=repeats,
        part_repeats=part_repeats, ops=ops_backend.value, merge_impl=merge_impl.value,
    )
    names = None if compare is None else [n for n in _csv("--compare", compare) if n != "none"]
    columns = (TextColumn("[bold]{task.fields[phase]:<9}"), BarColumn(bar_width=24), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1.0, phase="setup")

        def progress(phase: str, fraction: float, message: str) -> None:
            bar.update(task, completed=fraction, description=message, phase=phase)

        report = run_search(ckpt, out=out, model=model, family=family.value if family else None, data=data,
                            compare=names, base_recipe=base_recipe, settings=settings, progress=progress)
    console.print(_summary(report))
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    files = ", ".join(Path(p).name for p in (report["outputs"]["json"], report["outputs"]["markdown"], report["outputs"]["plot"]))
    where = Path(report["outputs"]["json"]).parent
    if report["status"] != "found":
        console.print(f"wrote {where}/ ({files})", highlight=False)
        raise RmeetoError(report["message"])
    console.print(report["message"], highlight=False)
    console.print(f"wrote {report['recipe']} and {where}/ ({files}); next: rmeeto compress CKPT --recipe {report['recipe']}",
                  highlight=False)
