"""Recovery re-training of a merged Vision Mamba (R-MeeTo): distillation from the unmerged
model, resumable checkpoints, multi-GPU through torchrun.

``fit(student, teacher, recipe, data_dir, out_dir, ...)`` runs it and writes ``compressed.pt``,
``best.pt``, ``checkpoint.pt``, ``log.jsonl`` and ``summary.md``; ``evaluate`` measures a model
on a loader; ``evaluate_checkpoint`` is ``rmeeto eval``.
"""

from ._build import make_student
from .checkpoint import load_checkpoint
from .data import check_data_dir, check_eval_dir
from .evaluation import evaluate_checkpoint
from .loop import FitResult, NonFiniteLoss, TrainingInterrupted, evaluate, fit, train_one_epoch, train_step
from .loss import DistillationLoss, distill_kl

__all__ = [
    "fit",
    "train_one_epoch",
    "train_step",
    "evaluate",
    "evaluate_checkpoint",
    "make_student",
    "load_checkpoint",
    "check_data_dir",
    "check_eval_dir",
    "DistillationLoss",
    "distill_kl",
    "FitResult",
    "TrainingInterrupted",
    "NonFiniteLoss",
]
