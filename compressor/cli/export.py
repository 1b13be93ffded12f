"""``rmeeto export CKPT --onnx out.onnx``: an official or compressed checkpoint → a checked ONNX file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import ops
from ..errors import RmeetoError
from ..export import ExportReport, export_onnx
from ..loading import load_model
from ._app import command, console
from ._options import ModelFactory, ModelKwargs
from .info import Family

#: how the selective scan is written into the graph (``compressor.ops.EXPORT_SCANS``)
Scan = Enum("Scan", {s: s for s in ops.EXPORT_SCANS}, type=str)


@command("export")
def export(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: official Vim/VideoMamba (.pth) or an rmeeto compressed one.", show_default=False)],
    onnx: Annotated[Path, typer.Option("--onnx", help="Output .onnx file (written atomically, after the parity check).", show_default=False)],
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's, 18 or newer).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Fixed batch size of the graph (default 1).", min=1)] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic (H and W stay fixed).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Export in half precision (for the CUDA execution provider).")] = False,
    scan: Annotated[
        Scan,
        typer.Option(help="How the scan is written: loop (one Scan node per direction: smallest graph, fastest on ONNX "
                          "Runtime's CPU provider), ssd (loop-free, no control flow: for the CUDA provider and its CUDA "
                          "graphs), chunked (older unrolled form), ref (unrolled per token)."),
    ] = Scan(ops.EXPORT_SCAN_DEFAULT),
    family: Annotated[Optional[Family], typer.Option(help="Model family of an official checkpoint (the file cannot tell).")] = None,
    model_factory: ModelFactory = None,
    model_kwargs: ModelKwargs = None,
    rtol: Annotated[
        Optional[float], typer.Option(help="Max |ORT - PyTorch| / max |PyTorch| allowed (default 1e-4; 1e-2 with --fp16).", min=0.0)
    ] = None,
):
    """Export a checkpoint to ONNX with fixed image size; check it against PyTorch with ONNX Runtime."""
    if dynamic_batch and batch is not None:
        raise RmeetoError("choose either --batch B (a fixed batch) or --dynamic-batch, not both")
    model = load_model(ckpt, family=family.value if family else "vim", backend="auto", factory=model_factory,
                       factory_kwargs=model_kwargs)
    with console.status(f"exporting {ckpt.name} (minutes for a depth-24 model) and checking it with ONNX Runtime"):
        report = export_onnx(model, onnx, opset=opset, batch=batch or 1, dynamic_batch=dynamic_batch, fp16=fp16, rtol=rtol,
                             scan=scan.value)
    console.print(_table(report))


def _table(r: ExportReport) -> Table:
    table = Table(title=f"ONNX export: {r.path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    shape = "x".join(map(str, r.input_shape))
    rows = [
        ("input shape", shape + (" (dynamic batch)" if r.dynamic_batch else "")),
        ("opset", str(r.opset)),
        ("scan", r.scan),
        ("nodes", f"{r.node_count:,}" + (f" ({r.nodes_per_block:.0f} per block)" if r.nodes_per_block else "")),
        ("file size", f"{r.file_size / 2**20:.2f} MiB"),
        ("export time", f"{r.export_seconds:.1f} s"),
    ]
    if r.max_abs_diff is not None:
        rows += [
            ("max abs diff", f"{r.max_abs_diff:.3g}"),
            ("max rel diff", f"{r.max_rel_diff:.3g}"),
            ("top-1 agreement", f"{r.top1_agreement:.1%}"),
            ("ORT latency", f"{r.ort_latency_ms:.2f} ms (median, batch {r.input_shape[0] if not r.dynamic_batch else 1})"),
            ("providers", ", ".join(r.providers)),
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table
