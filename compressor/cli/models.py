"""``rmeeto models``: the registered model names (``--model`` of ``recipes show`` and ``profile``)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from ..models.registry import get_config, list_models
from ..flops import count_flops
from ._app import command, console


@command()
def models():
    """List the registered model configurations: family, width, depth, image size and tokens."""
    table = Table(title="registered models (--model NAME of recipes show and profile)", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, right in (("name", False), ("family", False), ("dim", True), ("depth", True), ("image / patch / stride", True),
                       ("tokens", True), ("classes", True), ("GFLOPs", True)):
        table.add_column(col, justify="right" if right else "left", no_wrap=not right)
    for name in list_models():
        cfg = get_config(name)
        table.add_row(name, cfg.family, str(cfg.embed_dim), str(cfg.depth), f"{cfg.img_size} / {cfg.patch_size} / {cfg.stride}",
                      str(cfg.num_tokens), str(cfg.num_classes), f"{count_flops(cfg, [])['gflops_both']:.3g}")
    console.print(table)
