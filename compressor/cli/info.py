"""``rmeeto info CKPT``: what a checkpoint holds and how rmeeto reads it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

import torch

from .. import ops
from ..loading import describe
from ..merge import inference_merge_impl
from ._app import command, console
from ._options import ModelFactory, ModelKwargs


class Family(str, Enum):
    vim = "vim"
    videomamba = "videomamba"


@command()
def info(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint file (.pth/.pt): official Vim/VideoMamba or rmeeto.", show_default=False)],
    family: Annotated[
        Optional[Family],
        typer.Option(help="Model family: the two share their state_dict layout, so the file cannot tell."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Describe the model_ema weights instead of model.")] = False,
    model_factory: ModelFactory = None,
    model_kwargs: ModelKwargs = None,
):
    """Show the architecture inferred from a checkpoint, its size and how it would run here;
    with --model-factory, what the converter finds in your own model class."""
    d = describe(ckpt, family=family.value if family else None, ema=ema, factory=model_factory, factory_kwargs=model_kwargs)
    table = Table(title=f"{ckpt}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in _rows(d):
        table.add_row(name, value)
    console.print(table)
    if d.get("ambiguity"):
        console.print(f"[yellow]note:[/yellow] {d['ambiguity']} (read as vim here)", highlight=False)


def _rows(d: dict) -> list[tuple[str, str]]:
    rows = [("top-level keys", ", ".join(d["top_level_keys"]))]
    if d["rmeeto_format"] is not None:
        rows += _compressed_rows(d)
    elif d.get("factory") is not None:
        rows += [("model", f"{d['factory'].target} (your own class)"), *_layout_rows(d["layout"]),
                 ("parameters", f"{d['parameters']:,}")]
    else:
        rows += _official_rows(d)
    if d["rmeeto_format"] is None:
        rows += [("model_ema", "yes (--ema)" if d["has_ema"] else "no")]
    if "epoch" in d:
        rows += [("epoch", "-" if d["epoch"] is None else str(d["epoch"])), ("args.model", d["model_name"] or "-")]
    return rows + _environment_rows()


def _official_rows(d: dict) -> list[tuple[str, str]]:
    cfg = d["config"]
    source = {"args.model": " (from args.model)", "--family": "", "keys": " (video: read off temporal_pos_embedding)"}.get(
        d.get("family_source"), " (assumed)")
    family = cfg.family + source
    cls = "none (mean pooling)" if d["cls_index"] is None else f"{d['cls_index']} ({d['cls_position']})"
    patches = f"{cfg.grid}x{cfg.grid} patches" if not cfg.is_video else f"{cfg.token_frames} frames of {cfg.grid}x{cfg.grid} patches"
    rows = [
        ("family", family),
        ("embed dim", str(cfg.embed_dim)),
        ("depth", str(cfg.depth)),
        ("d_state / expand / dt_rank", f"{cfg.d_state} / {cfg.expand} / {cfg.rank}"),
        ("image / patch / stride", f"{cfg.img_size} / {cfg.patch_size} / {cfg.stride}"),
        *([("frames / tubelet", f"{cfg.num_frames} / {cfg.tubelet}")] if cfg.is_video else []),
        ("tokens", f"{d['tokens']} ({patches})"),
        ("class token", cls),
        ("classes", str(cfg.num_classes)),
        ("parameters", f"{d['parameters']:,}"),
    ]
    if d["note"]:
        rows.append(("loading", d["note"]))
    return rows


def _compressed_rows(d: dict) -> list[tuple[str, str]]:
    src = d["source"]
    made_of = (f"{src['arch'].get('family', 'vim')} (rmeeto zoo architecture)" if src.get("kind") == "zoo"
               else f"{src.get('target')} (your own class; load with --model-factory {src.get('target')})")
    rows = [("format", f"rmeeto compressed, version {d['rmeeto_format']}"), ("family", str(d["family"])),
            ("model", made_of), ("recipe", str(d["recipe"]))]
    layout = d["layout"]
    if layout is not None and not isinstance(layout, dict):
        steps = d["steps"] or []
        rows += _layout_rows(layout)
        rows.append(("merges", f"{len(steps)}: {layout.num_tokens} -> {steps[-1].tokens_out if steps else layout.num_tokens} tokens"))
    return rows


def _layout_rows(layout) -> list[tuple[str, str]]:
    two = isinstance(layout.cls_index, tuple)
    if layout.cls_index is None:
        cls = "none"
    else:
        cls = f"{layout.cls_index[0]} and {layout.cls_index[1]} (two, both protected)" if two else str(layout.cls_index)
    read = "class tokens x[:, i] and x[:, j]" if two else "class token x[:, i]"
    rows = [
        ("blocks", f"{layout.depth} in {layout.blocks!r}, called as "
                   + ("block(hidden, residual) -> (hidden, residual)" if layout.block_call == "hidden_residual" else "block(x) -> x")),
        ("input", "x".join(map(str, layout.input_shape))),
        ("tokens / width", f"{layout.num_tokens} / {layout.embed_dim}"),
        ("class token", cls + (f" ({layout.cls_param})" if layout.cls_param else "")),
        ("readout", read if layout.readout == "token" else "mean over tokens (size-weighted after merges)"),
        ("classes", str(layout.num_classes)),
    ]
    if two:  # what the environment rows say about merges does not hold for this model
        rows.append(("merges here", "torch reference on every device (the Triton merge protects one class token)"))
    return rows


def _environment_rows() -> list[tuple[str, str]]:
    """How the ``auto`` choices resolve on this machine (not a property of the file)."""
    if not torch.cuda.is_available():
        backend, merges = "ref (no CUDA device: pure-PyTorch reference scan)", "torch reference (no CUDA device)"
    else:
        which = ops.resolve_backend("auto", torch.empty(0, device="cuda"))
        what = {"triton": "rmeeto's Triton kernels", "cuda": "mamba-ssm / causal-conv1d kernels",
                "chunked": "pure-PyTorch chunked scan"}[which]
        backend = f"{which} ({what}) on GPU, ref on CPU"
        merges = ("triton (3 kernels per merge) for inference on GPU, torch reference for training / CPU / export"
                  if inference_merge_impl("auto", "cuda") == "triton" else "torch reference (Triton not installed)")
    return [("backend auto", backend), ("merges auto", merges)]
