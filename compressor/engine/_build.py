"""Building what the loop trains with: student, teacher, optimizer, lr schedule, precision."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import RmeetoError, first_line

__all__ = ["make_student", "prepare_teacher", "amp_settings", "build_optimizer", "build_scheduler", "scaled_lr", "lr_warning"]

# Vim's / VideoMamba's model.no_weight_decay(): the learned embeddings are not decayed (1-d
# params and biases are excluded by timm anyway)
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "temporal_pos_embedding")


def make_student(model: nn.Module, recipe) -> nn.Module:
    """The model to re-train, in train mode, every parameter trainable.

    ``model``: the pretrained model (rmeeto's VisionMamba, or a foreign Vision Mamba), or a
    model already converted with the same merges (its weights are taken over). rmeeto's own
    models are rebuilt with the recipe's drop path (``convert(VisionMamba(cfg'), recipe)``,
    traced in eval mode: the merge schedule and shapes do not depend on the mode, and the
    per-block drop paths stay live inside the blocks); a foreign model keeps its own.
    """
    from ..convert import ConvertedModel, convert
    from ..models.vim import VisionMamba

    old_recipe = getattr(model, "recipe", None) if isinstance(model, ConvertedModel) else None
    if old_recipe is not None and old_recipe.merge != recipe.merge:
        raise RmeetoError(
            f"the student was converted with the merges of recipe {old_recipe.name!r}, not those of {recipe.name!r}: "
            "convert it with the recipe you re-train with"
        )
    cfg = model.cfg if isinstance(model, (VisionMamba, ConvertedModel)) else None
    if cfg is None:  # a foreign model: its structure (and drop path) is its own
        student = copy.deepcopy(model) if isinstance(model, ConvertedModel) else convert(model, recipe)
        return student.train().requires_grad_(True)
    base = VisionMamba(cfg.replace(drop_path_rate=recipe.retrain.drop_path))
    student = convert(base.eval(), recipe)
    try:
        student.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:
        raise RmeetoError(f"cannot copy the weights into the student: {first_line(e)}") from None
    _copy_backend(model, student)
    return student.train().requires_grad_(True)


def _copy_backend(src: nn.Module, dst: nn.Module) -> None:
    backends = {getattr(m, "backend", None) for m in src.modules()} - {None}
    if len(backends) == 1:
        from ..models.vim import set_backend

        set_backend(dst, backends.pop())


def prepare_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """The pretrained model without merges: eval mode (no drop path), frozen, on ``device``."""
    return model.to(device).eval().requires_grad_(False)


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """``(autocast dtype or None, use GradScaler, description)``. CPU always runs fp32."""
    if device.type != "cuda" or amp == "off":
        note = "fp32" if amp in ("off", "auto") else f"fp32 (amp {amp} needs CUDA)"
        return None, False, note
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "bf16":
        return torch.bfloat16, False, "bf16 autocast"
    return torch.float16, True, "fp16 autocast + GradScaler"


def scaled_lr(base_lr: float, batch_size: int, world_size: int) -> float:
    """The recipe's lr is for a global batch of 512: scale linearly (DeiT's rule)."""
    return base_lr * batch_size * world_size / 512


#: Below either bound the linearly scaled lr is reported as negligible (re-training at 6.25e-7 left
#: a model's top-1 unchanged: 13.5 -> 13.5).
NEGLIGIBLE_LR, NEGLIGIBLE_FRACTION = 1e-6, 0.05


def lr_warning(retrain, world_size: int) -> str:
    """One line when linear scaling makes the lr negligible (below :data:`NEGLIGIBLE_LR`, or below
    :data:`NEGLIGIBLE_FRACTION` of the recipe's base), naming ``--lr``; "" otherwise."""
    lr = scaled_lr(retrain.lr, retrain.batch_size, world_size)
    if lr >= NEGLIGIBLE_LR and lr >= NEGLIGIBLE_FRACTION * retrain.lr:
        return ""
    keep = retrain.lr * 512 / (retrain.batch_size * world_size)
    return (
        f"warning: the lr scales linearly to {lr:.3g} at global batch {retrain.batch_size * world_size} "
        f"({retrain.lr:g} per 512): too small to change the model much; pass --lr (base per 512) to raise it, "
        f"e.g. --lr {keep:.3g} trains at {retrain.lr:g}"
    )


def build_optimizer(student: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm AdamW; no weight decay on biases, norms, 1-d params and the embeddings."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    groups = param_groups_weight_decay(student, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, retrain, steps_per_epoch: int, lr_scale: float = 1.0):
    """timm cosine schedule updated per step (``t_in_epochs=False``): linear warmup over
    ``warmup_epochs``, then cosine from lr to ``min_lr`` at the last step. ``min_lr`` is scaled
    like ``lr`` (``lr_scale`` = global batch / 512: 1 in the paper's setting), so a small batch
    never gets a floor above its peak."""
    from timm.scheduler import CosineLRScheduler

    warmup = retrain.warmup_epochs * steps_per_epoch
    total = retrain.epochs * steps_per_epoch
    min_lr = retrain.min_lr * lr_scale
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=min_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
