"""The resumable training checkpoint (``OUT/checkpoint.pt``).

Written atomically (temp file + rename), so a run killed at any moment, even with SIGKILL,
leaves the previous complete checkpoint. It holds everything a resume needs to continue the
same run bit-for-bit on CPU (deterministic ops, ``num_workers=0``)::

    rmeeto_checkpoint   format version
    model, optimizer, scheduler, scaler, ema      state_dicts (ema/scaler may be None)
    epoch               completed epochs        step            optimizer steps so far
    step_in_epoch       batches done in the current epoch (0 at an epoch boundary)
    epoch_loss          [loss sum, batches] of the current epoch (mid-epoch only)
    sampler_epoch       the epoch the data order is drawn for
    best_top1, best_epoch, history (one dict per epoch = log.jsonl), baseline (accuracies)
    rng                 per rank: python, numpy, torch, cuda generator states
    recipe, arch        the resolved recipe (recipe_to_dict) and the model config (to_dict)
    world_size, elapsed (seconds of training so far)

Only plain data and tensors: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_torch_save
from ..errors import CheckpointError, RmeetoError, first_line

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "check_resumable",
    "RESUME_RESCALED",
]

CHECKPOINT_FORMAT = 1
# keys that may differ between the run that wrote a checkpoint and the one resuming it
_RESUME_FREE = {"num_workers"}
# ... and those that may differ with consequences the resume applies and reports (the lr is
# rescaled and the steps per epoch change: compressor.engine._setup.restore_state)
RESUME_RESCALED = {"batch_size"}
# what to pass to get a setting back to the original run's value
_OPTION = {"lr": "--lr", "distill": "--distill/--no-distill", "seed": "--seed", "epochs": "--retrain-epochs"}


def capture_rng() -> dict:
    """This process's random generator states as plain data and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` (see the module docstring) atomically."""
    return atomic_torch_save({"rmeeto_checkpoint": CHECKPOINT_FORMAT, **payload}, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (``weights_only``: no code runs). One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}: nothing to resume; drop --resume to start a new run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        reason = first_line(e, limit=160)
        raise CheckpointError(f"training checkpoint {path} cannot be read ({reason}): start a new run without --resume") from None
    if not isinstance(obj, dict) or obj.get("rmeeto_checkpoint") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an rmeeto training checkpoint of format {CHECKPOINT_FORMAT}: start a new run without --resume"
        )
    return obj


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, checkpoint value, current value)`` for every leaf that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in _RESUME_FREE:
                out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix[:-1], a, b)]


def check_resumable(ckpt: dict, recipe: dict, arch: dict, path: str | os.PathLike) -> dict[str, tuple]:
    """A resume must continue the same run: same model, same resolved recipe (except
    ``num_workers``). :data:`RESUME_RESCALED` settings may change: they are returned as
    ``{key: (checkpoint value, current value)}``. A refusal names the first other setting that
    differs and exactly what to do."""
    path = Path(path)
    fresh = f"or start a new run: another -o, or delete {path}"
    diff = _differences(ckpt.get("arch"), arch)
    if diff:
        key, old, new = diff[0]
        raise RmeetoError(
            f"cannot resume from {path}: it holds another model ({key}: checkpoint {old!r}, now {new!r}); "
            f"pass the checkpoint the run started from, {fresh}"
        )
    changed = {}
    for key, old, new in _differences(ckpt.get("recipe"), recipe):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in RESUME_RESCALED:
            changed[leaf] = (old, new)
            continue
        option = _OPTION.get(leaf)
        if option and isinstance(old, bool):  # --distill/--no-distill
            on, off = option.split("/")
            how = f"pass {on if old else off} (as the original run)"
        else:
            how = f"pass {option} {old!r} (the original run's)" if option else "use the original run's recipe"
        raise RmeetoError(f"cannot resume from {path}: the recipe differs in {key} (checkpoint {old!r}, now {new!r}); {how}, {fresh}")
    return changed
