"""The re-training loss: classification on the (mixed) targets plus distillation from the
unmerged teacher, as the R-MeeTo paper re-trains::

    loss = CE(student, targets) + w · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

CE is timm's SoftTargetCrossEntropy when Mixup/CutMix give soft targets, label-smoothing CE
when only smoothing is on, plain CE otherwise. KL uses ``batchmean`` (the true KL divergence per
sample) and is computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DistillationLoss", "distill_kl", "build_criterion"]


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` at temperature ``T``, ``batchmean``. Logits: ``(b, classes)``."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """``base(student, target) + weight · distill_kl(student, teacher, T)``; the KL term is
    skipped when ``teacher_logits`` is None (``--no-distill``)."""

    def __init__(self, base: nn.Module, weight: float = 0.5, temperature: float = 1.0):
        super().__init__()
        self.base, self.weight, self.temperature = base, weight, temperature

    def forward(self, student_logits, target, teacher_logits=None):
        loss = self.base(student_logits.float(), target)
        if teacher_logits is not None and self.weight > 0:
            loss = loss + self.weight * distill_kl(student_logits, teacher_logits, self.temperature)
        return loss


def build_criterion(retrain, mixup_active: bool, distill: bool) -> DistillationLoss:
    """The loss for a ``[retrain]`` table: soft-target CE under Mixup (the targets carry the
    smoothing), label-smoothing CE, or CE; distillation weight 0 when ``distill`` is off."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        base = SoftTargetCrossEntropy()
    elif retrain.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=retrain.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    weight = retrain.distill_weight if distill else 0.0
    return DistillationLoss(base, weight=weight, temperature=retrain.distill_temperature)
