"""``rmeeto recipes``: list the built-in recipes; ``rmeeto recipes show``: what one does to a model."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer
from rich import box
from rich.table import Table

from ..merge.schedule import cls_per_layer, merge_schedule, reduction_ratio
from ..models.registry import get_config
from ..flops import count_flops, paper_reduction_ratio
from ..recipes import Recipe, list_recipes, load_recipe
from ._app import app, console, user_errors

recipes_app = typer.Typer(
    help="Built-in re-training recipes: list them, or show one's token schedule and FLOPs.",
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode=None,  # as the main app (compressor.cli._app)
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
@user_errors
def recipes(ctx: typer.Context):
    """List the built-in recipes (``rmeeto recipes show NAME`` for one in detail)."""
    if ctx.invoked_subcommand is not None:
        return
    title = "built-in recipes (details: rmeeto recipes show NAME --model MODEL)"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("mode")
    table.add_column("num\nprune", justify="right")
    table.add_column("final\ntokens", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("description")
    for r in list_recipes():
        m = r.merge
        final = str(m.final_tokens or "-")
        table.add_row(r.name, m.mode, str(m.num_prune), final, str(r.retrain.epochs), r.description)
    console.print(table)


def _merge_summary(r: Recipe) -> str:
    m = r.merge
    where = f"layers {list(m.layers)}" if m.layers else f"every {m.interval} layers" + (" (odd)" if m.odd else "")
    final = f", last merge down to {m.final_tokens} tokens" if m.final_tokens else ""
    order = "ordered" if m.ordered else "unordered"
    return f"{m.mode} {m.num_prune} tokens {where}{final}, {order}, {m.distance}"


@recipes_app.command("show")
@user_errors
def show(
    recipe: Annotated[str, typer.Argument(help="Built-in recipe name or path to a .toml recipe.")],
    model: Annotated[str, typer.Option(help="Registered model name (rmeeto models lists them).")] = "vim_small",
    img_size: Annotated[Optional[int], typer.Option(help="Input resolution (default: the model's).")] = None,
    graph: Annotated[bool, typer.Option("--graph", help="Also print the converted torch.fx graph (the code it runs).")] = False,
):
    """Per-layer token schedule, reduction ratio and FLOPs (baseline vs recipe) of RECIPE on MODEL."""
    r = load_recipe(recipe)
    cfg = get_config(model, **({"img_size": img_size} if img_size is not None else {}))
    steps = merge_schedule(r.merge, cfg.num_tokens, cfg.cls_index, cfg.depth)
    by_layer = {s.layer: s for s in steps}
    cls = cls_per_layer(steps, cfg.cls_index, cfg.depth)

    console.print(f"[bold]{r.name}[/bold]: {r.description}", highlight=False)
    console.print(
        f"{model}: {cfg.img_size} px, {cfg.num_tokens} tokens, depth {cfg.depth}, class token "
        f"{'-' if cfg.cls_index is None else f'at {cfg.cls_index}'}; merge: {_merge_summary(r)}",
        highlight=False,
    )
    table = Table(title="token schedule")
    for col in ("layer", "tokens", "class token", "merge before"):
        table.add_column(col, justify="right")
    L = cfg.num_tokens
    for i in range(cfg.depth):
        s = by_layer.get(i)
        L = s.tokens_out if s else L
        table.add_row(str(i), str(L), "-" if cls[i] is None else str(cls[i]), f"-{s.r}" if s else "")
    console.print(table)

    ratio = reduction_ratio(steps, cfg.num_tokens, cfg.depth)
    ratio_paper = paper_reduction_ratio(cfg, r.merge)
    console.print(f"reduction ratio: {ratio:.2f} (as the paper counts it: {ratio_paper:.2f})", highlight=False)

    base, ours = count_flops(cfg, []), count_flops(cfg, steps, merge=r.merge)
    flops = Table(title="GFLOPs")
    for col in ("convention", "baseline", r.name, "change"):
        flops.add_column(col, justify="right")
    for key, label in (("gflops_both", "both scan directions"), ("gflops_paper", "paper (one direction)")):
        b, o = base[key], ours[key]
        flops.add_row(label, f"{b:.4f}", f"{o:.4f}", f"{(o - b) / b:+.1%}")
    console.print(flops)
    note = "paper convention: num_prune removed at every merge layer, uncapped, matching paid even for 0"
    if min(ours["tokens_paper"]) <= 0:
        note += "; here it removes more tokens than exist, so its numbers are nominal"
    console.print(f"[dim]{note}[/dim]", highlight=False)
    if graph:
        from ..convert import convert
        from ..models.vim import VisionMamba

        with torch.device("meta"):  # shapes only: no weights are allocated
            gm = convert(VisionMamba(cfg), r)
        console.print(gm.code.strip(), highlight=False, markup=False, soft_wrap=True)
