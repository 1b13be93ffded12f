"""Training-free quality of a merge schedule: how closely the merged model follows the unmerged
one on calibration images (top-1 agreement, KL of the logits) and, when the images carry the
model's labels, its top-1 accuracy.

Calibration images come from an ImageFolder (``DIR/val``, ``DIR/test`` or ``DIR`` itself: a
seeded random subset, resized and center-cropped as ``rmeeto eval`` does) or, without a folder,
are generated: smooth random colour fields, which only say how much the merges change the
logits on inputs unlike real photographs (the CLI says so). Scoring runs in fp32 on the device
(as ``rmeeto profile``'s accuracy), so agreement is not blurred by fp16 rounding.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..convert import convert
from ..errors import RmeetoError
from ..merge import set_merge_impl
from ..models.vim import VisionMamba, set_backend
from .space import Schedule, Space

__all__ = ["Calibration", "QualityScorer", "OBJECTIVES", "load_calibration", "generated_calibration", "objective_key"]

#: what the search maximises: ``agreement`` (top-1 agreement with the unmerged model, ties broken
#: by lower KL), ``kl`` (lower KL of the logits), ``top1`` (accuracy against labels, then agreement)
OBJECTIVES = ("agreement", "kl", "top1")


@dataclass
class Calibration:
    """``images: (n, c, h, w)`` fp32 (normalised as the model expects), ``labels: (n,)`` or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    source: str


def generated_calibration(num_images: int, in_chans: int, img_size: int, seed: int = 0) -> Calibration:
    """Smooth random colour fields (bilinearly upsampled 4x4..16x16 noise), mean 0, std ~1."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(num_images, in_chans, img_size, img_size)
    for k, cells in enumerate((4, 8, 16)):
        noise = torch.randn(num_images, in_chans, cells, cells, generator=g) / (k + 1)
        out += F.interpolate(noise, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return Calibration(out / out.std(), None, f"{num_images} generated images (smooth random noise, seed {seed})")


def load_calibration(data: str | os.PathLike, num_images: int, img_size: int, crop_pct: float, num_classes: int,
                     seed: int = 0, held_out: bool = False) -> Calibration:
    """A seeded random subset of ``num_images`` images of the folder's evaluation split (with
    ``held_out``: every image *outside* that subset, for checking a search on images it did not
    score). Labels are kept when the folder's class count equals the head's (the folder is then
    taken to hold the model's classes)."""
    from ..engine.data import build_eval_loader, check_eval_dir

    spec = check_eval_dir(data)
    dataset = build_eval_loader(spec, img_size, crop_pct, batch_size=1, num_workers=0).dataset
    if len(dataset) == 0:
        raise RmeetoError(f"{spec.val} holds no images: pass a folder with images or leave --data out")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(dataset), generator=g)
    chosen = perm[num_images:] if held_out else perm[:num_images]
    idx = chosen.sort().values.tolist()
    if not idx:
        raise RmeetoError(f"{spec.val} has only {len(dataset)} images: none are left outside the {num_images} scored")
    images, labels = zip(*(dataset[i] for i in idx))
    has_labels = len(spec.classes) == num_classes
    what = f"the {len(idx)} images of {spec.val} outside the seed-{seed} subset of {num_images}" if held_out else \
        f"{len(idx)} images of {spec.val} (seed {seed})"
    source = what + ("" if has_labels else f", {len(spec.classes)} classes: no labels for a {num_classes}-class head")
    return Calibration(torch.stack(images), torch.tensor(labels) if has_labels else None, source)


def objective_key(quality: dict, objective: str) -> tuple:
    """Sort key, larger is better."""
    if objective == "agreement":
        return (quality["agreement"], -quality["kl"])
    if objective == "kl":
        return (-quality["kl"],)
    if objective == "top1":
        return (quality["top1"], quality["agreement"], -quality["kl"])
    raise RmeetoError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


class QualityScorer:
    """Scores schedules of ``model`` (the plain model, fp32, on ``device``) on ``calib``.

    The unmerged model's logits are computed once; :meth:`__call__` converts the model with a
    schedule, runs the images in batches of ``batch_size`` and returns
    ``{"agreement", "kl", "top1" (None without labels), "seconds"}``.
    """

    def __init__(self, model: VisionMamba, space: Space, calib: Calibration, *, device: str, batch_size: int = 64,
                 ops: str = "auto", merge_impl: str = "auto"):
        self.model, self.space, self.calib = model, space, calib
        self.device, self.batch_size, self.ops, self.merge_impl = device, batch_size, ops, merge_impl
        self.images = calib.images.to(device)
        self.labels = None if calib.labels is None else calib.labels.to(device)
        t0 = time.perf_counter()
        self.reference = self._logits(convert(model, space.config(space.plain())))
        self.reference_s = time.perf_counter() - t0
        self.ref_logp = F.log_softmax(self.reference, dim=-1)
        self.ref_top1 = self.reference.argmax(-1)
        self.plain_top1 = self._top1(self.ref_top1)

    def _logits(self, gm) -> torch.Tensor:
        gm = set_backend(gm.eval(), self.ops).to(self.device, torch.float32)
        set_merge_impl(gm, self.merge_impl)
        with torch.inference_mode():
            out = [gm(self.images[i : i + self.batch_size]).float() for i in range(0, len(self.images), self.batch_size)]
        return torch.cat(out)

    def _top1(self, pred: torch.Tensor) -> float | None:
        return None if self.labels is None else (pred == self.labels).float().mean().item()

    def __call__(self, s: Schedule) -> dict:
        t0 = time.perf_counter()
        logits = self._logits(convert(self.model, self.space.config(s)))
        logp = F.log_softmax(logits, dim=-1)
        kl = (self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean().clamp_min(0).item()
        pred = logits.argmax(-1)
        return {"agreement": (pred == self.ref_top1).float().mean().item(), "kl": kl, "top1": self._top1(pred),
                "seconds": time.perf_counter() - t0}
