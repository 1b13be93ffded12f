"""``rmeeto profile CKPT -o report/``: speed, merge overhead, FLOPs and accuracy of a compressed
model against its baseline (or of recipes applied to an official checkpoint)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import ops
from ..merge import MERGE_IMPLS
from ..errors import RmeetoError
from ..profile.report import to_table
from ..loading import as_factory
from ..profile.run import ProfileInterrupted, ProfileSettings, run_profile
from ._app import command, console
from ._options import ModelFactory, ModelKwargs
from ._progress import ProgressView


class Family(str, Enum):
    vim = "vim"
    videomamba = "videomamba"


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


class DType(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


OpBackend = Enum("OpBackend", {b: b for b in ops.BACKENDS}, type=str)
MergeImpl = Enum("MergeImpl", {b: b for b in MERGE_IMPLS}, type=str)


def _csv(option: str, text: str | None) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise RmeetoError(f"{option} is empty: give a comma-separated list")
    return items


def _ints(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(option, text))
    except ValueError:
        raise RmeetoError(f"{option} must be comma-separated integers, got {text!r}") from None


@command()
def profile(
    ckpt: Annotated[Optional[Path], typer.Argument(metavar="CKPT", help="Compressed (rmeeto) or official checkpoint (or --model NAME).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for report.json, report.md and the plots.")] = Path("report"),
    baseline: Annotated[Optional[Path], typer.Option(help="Baseline checkpoint (default: CKPT's weights without merging).", show_default=False)] = None,
    recipes: Annotated[Optional[str], typer.Option(help="Comma-separated recipes applied training-free to the baseline, e.g. r014,r031,r056.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Registry model with random weights instead of CKPT (speed only), e.g. vim_small.", show_default=False)] = None,
    family: Annotated[Optional[Family], typer.Option(help="Model family of an official checkpoint (the file cannot tell).", show_default=False)] = None,
    device: Annotated[Optional[Device], typer.Option(help="Where to run (default: cuda if available, else cpu).", show_default=False)] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(help="Comma-separated batch sizes (default: 1,8,64,128 on cuda, 1,8 on cpu).", show_default=False)] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="Precision (default: fp16 on cuda, fp32 on cpu).", show_default=False)] = None,
    backends: Annotated[Optional[str], typer.Option(help="Comma-separated: eager, graph (one CUDA graph), compile (torch.compile), onnxruntime (default: eager,graph on cuda, eager on cpu).", show_default=False)] = None,
    ops_backend: Annotated[OpBackend, typer.Option("--ops", help="Op backend of the scan / conv / norm.")] = OpBackend("auto"),
    merge_impl: Annotated[MergeImpl, typer.Option(help="How merges run: auto (Triton kernels on CUDA), torch (reference) or triton.")] = MergeImpl("auto"),
    warmup: Annotated[Optional[int], typer.Option(help="Untimed calls before timing (default: 5 on cuda, 1 on cpu).", min=0, show_default=False)] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Timed calls per model, backend and batch size (default: 30 on cuda; on cpu 3-30, as fit --time-budget).", min=1, show_default=False)] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="Seconds of timed calls for the whole profile, shared by all series (default: 45 on cpu, none on cuda; 0: exactly --repeats).", min=0, show_default=False)] = None,
    overhead: Annotated[Optional[str], typer.Option(help="Merge-overhead methods, comma-separated: sliced, hooks, or none (default: sliced,hooks on cuda, hooks on cpu).", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU intra-op threads (default: all, or 1 when the machine is busy).", min=1, show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="ImageFolder dataset (DIR/val or DIR/test) for top-1 / top-5, in the timed dtype and fp32.", show_default=False)] = None,
    eval_batch_size: Annotated[int, typer.Option(help="Batch size of the accuracy evaluation.")] = 64,
    crop_pct: Annotated[Optional[float], typer.Option(help="Eval center-crop fraction for every model (default: each model's recipe, 0.875).", min=0.1, max=1.0)] = None,
    workers: Annotated[int, typer.Option(help="Data loader worker processes for the evaluation.")] = 4,
    model_factory: ModelFactory = None,
    model_kwargs: ModelKwargs = None,
):
    """Time the compressed model and its baseline per backend and batch size; write a report.

    Ctrl-C writes a partial report of what was measured."""
    settings = ProfileSettings(
        device=device.value if device else "auto",
        batch_sizes=_ints("--batch-sizes", batch_sizes) if batch_sizes is not None else None,
        dtype=dtype.value if dtype else None,
        backends=tuple(_csv("--backends", backends)) if backends is not None else None,
        warmup=warmup,
        repeats=repeats,
        time_budget_s=time_budget,
        ops=ops_backend.value,
        overhead=tuple(m for m in _csv("--overhead", overhead) if m != "none") if overhead is not None else None,
        eval_batch_size=eval_batch_size,
        crop_pct=crop_pct,
        eval_workers=workers,
        merge_impl=merge_impl.value,
        threads=threads,
    )
    interrupted = False
    with ProgressView(console) as view:
        try:
            report = run_profile(
                ckpt, out_dir=out, baseline=baseline, recipes=_csv("--recipes", recipes) if recipes is not None else (),
                model=model, family=family.value if family else None, data=data, settings=settings, progress=view.update,
                factory=as_factory(model_factory, model_kwargs),
            )
        except ProfileInterrupted as e:
            report, interrupted = e.report, True
    console.print(to_table(report))
    for note in report["notes"] + [f"{e['name']}: {n}" for e in report["models"] for n in e["notes"]]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    files = ", ".join(Path(p).name for p in report.get("outputs", {}).values())
    console.print(f"wrote {out}/ ({files})" + (" [partial: interrupted]" if interrupted else ""), highlight=False)
    if interrupted:
        raise typer.Exit(130)
