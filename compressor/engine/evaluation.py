"""``rmeeto eval``: accuracy and throughput of a checkpoint on an ImageFolder split."""

from __future__ import annotations

import os

from ..errors import RmeetoError
from .data import build_eval_loader, check_eval_dir
from .distributed import resolve_device
from .loop import evaluate

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike, *, batch_size: int = 128,
                        device: str | None = None, family: str = "vim", num_workers: int = 4,
                        crop_pct: float | None = None) -> dict:
    """Top-1/top-5 (%), mean cross-entropy and images/s of the model in ``path`` (an official
    checkpoint or an rmeeto compressed one) on ``data_dir/val`` (or ``test/``, or the class
    folders of ``data_dir`` itself). fp32; the crop follows the checkpoint's recipe
    (``eval_crop_pct``) unless ``crop_pct`` is given, 0.875 by default."""
    from ..models import load_model

    if batch_size < 1 or num_workers < 0:
        raise RmeetoError("--batch-size must be >= 1 and --workers >= 0")
    dev = resolve_device(device)
    model = load_model(path, family=family)
    cfg = model.cfg
    spec = check_eval_dir(data_dir, num_classes=cfg.num_classes)
    recipe = getattr(model, "recipe", None)
    if crop_pct is None:
        crop_pct = recipe.retrain.eval_crop_pct if recipe is not None else 0.875
    loader = build_eval_loader(spec, cfg.img_size, crop_pct, batch_size=batch_size, num_workers=num_workers,
                               pin_memory=dev.type == "cuda")
    metrics = evaluate(model.to(dev), loader, device=dev)
    steps = list(getattr(model, "steps", []))
    return {
        **metrics,
        "checkpoint": str(path),
        "data": str(spec.val),
        "classes": len(spec.classes),
        "recipe": recipe.name if recipe is not None else None,
        "tokens": (cfg.num_tokens, steps[-1].tokens_out if steps else cfg.num_tokens),
        "img_size": cfg.img_size,
        "crop_pct": crop_pct,
        "device": str(dev),
    }
