"""``rmeeto eval``: accuracy and throughput of a checkpoint on an ImageFolder split."""

from __future__ import annotations

import os

from ..errors import RmeetoError
from ._cpu import cpu_threads
from .data import auto_num_workers, build_eval_loader, check_eval_dir
from .distributed import resolve_device
from .loop import evaluate

__all__ = ["evaluate_checkpoint", "EVAL_WORKERS"]

EVAL_WORKERS = 4  # loader processes at most when none are asked for


def evaluate_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike, *, batch_size: int = 128,
                        device: str | None = None, family: str = "vim", num_workers: int | None = None,
                        crop_pct: float | None = None, factory=None, factory_kwargs=None) -> dict:
    """Top-1/top-5 (%), mean cross-entropy and images/s of the model in ``path`` (an official
    checkpoint or an rmeeto compressed one) on ``data_dir/val`` (or ``test/``, or the class
    folders of ``data_dir`` itself). fp32; the crop follows the checkpoint's recipe
    (``eval_crop_pct``) unless ``crop_pct`` is given, 0.875 by default. ``factory``: the model
    class of a foreign model (see :func:`compressor.loading.load_model`). ``num_workers``: loader
    processes (default: one per core but one, at most :data:`EVAL_WORKERS`)."""
    from ..loading import load_converted

    if num_workers is None:
        num_workers = auto_num_workers(EVAL_WORKERS)
    if batch_size < 1 or num_workers < 0:
        raise RmeetoError("--batch-size must be >= 1 and --workers >= 0")
    dev = resolve_device(device)
    model = load_converted(path, family=family, factory=factory, factory_kwargs=factory_kwargs)
    layout, steps = model.layout, model.steps
    spec = check_eval_dir(data_dir, num_classes=layout.num_classes)
    recipe = model.recipe  # ``none`` for an official checkpoint: the default crop (0.875)
    if crop_pct is None:
        crop_pct = recipe.retrain.eval_crop_pct
    loader = build_eval_loader(spec, layout.img_size, crop_pct, batch_size=batch_size, num_workers=num_workers,
                               pin_memory=dev.type == "cuda")
    with cpu_threads(dev):
        metrics = evaluate(model.to(dev), loader, device=dev)
    return {
        **metrics,
        "checkpoint": str(path),
        "data": str(spec.val),
        "classes": len(spec.classes),
        "recipe": recipe.name if steps or recipe.name != "none" else None,
        "tokens": (layout.num_tokens, steps[-1].tokens_out if steps else layout.num_tokens),
        "img_size": layout.img_size,
        "crop_pct": crop_pct,
        "device": str(dev),
    }
