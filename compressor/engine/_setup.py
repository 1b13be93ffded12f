"""Setting up, saving and restoring a re-training run; writing its outputs (rank 0 only)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_text
from .._io import check_out_dir as _check_writable
from ..errors import RmeetoError
from ._build import amp_settings, build_optimizer, build_scheduler, prepare_teacher, scaled_lr
from ._memory import available_bytes, fit_batch_size, probe_step_memory
from ._state import FitResult, RunLog, TrainState
from ._summary import print_summary, summary_rows, write_summary
from .checkpoint import capture_rng, check_resumable, load_checkpoint, restore_rng, save_checkpoint
from .data import build_eval_loader, build_mixup, build_train_loader
from .loss import build_criterion

CHECKPOINT, COMPRESSED, BEST, LOG, SUMMARY = "checkpoint.pt", "compressed.pt", "best.pt", "log.jsonl", "summary.md"


def check_out_dir(out_dir, resume: bool) -> Path:
    """``out_dir`` can be written (nothing is created: :func:`make_out_dir` does it once every
    other check has passed); without ``resume`` it must not hold a run."""
    out = _check_writable(out_dir)
    if not resume and (out / CHECKPOINT).exists():
        raise RmeetoError(
            f"{out} already holds a re-training run ({CHECKPOINT}): continue it with --resume (a different --batch-size "
            f"is fine), or start over with another -o or after deleting {out / CHECKPOINT}"
        )
    return out


def load_resume(path: Path, recipe, arch: dict, world_size: int) -> tuple[dict, dict]:
    """The checkpoint to resume from, checked to belong to this run (same model, recipe and
    number of processes: the data shards and RNG streams depend on it), and the settings that
    changed and are applied on resume (``{"batch_size": (old, new)}``)."""
    from ..recipes import recipe_to_dict

    ckpt = load_checkpoint(path)
    changed = check_resumable(ckpt, recipe_to_dict(recipe), arch, path)
    if ckpt.get("world_size", 1) != world_size:
        raise RmeetoError(
            f"cannot resume from {path}: it was written by {ckpt.get('world_size')} process(es), this run has {world_size}; "
            f"resume with {ckpt.get('world_size')} process(es) (torchrun --nproc_per_node), or start a new run: another -o, "
            f"or delete {path}"
        )
    return ckpt, changed


def fit_batch_to_memory(student, recipe, d, *, explicit: bool, reporter):
    """The recipe with a batch whose step fits in memory (:mod:`._memory`): an explicit
    ``--batch-size`` (or a resumed run's batch) that does not fit stops with one line naming one
    that does; the recipe's default is lowered to the largest that fits, said in one line. All
    ranks agree (the smallest wins). ``student``: from make_student (moved to the device)."""
    from ..recipes import with_overrides

    rt = recipe.retrain
    amp_dtype, _, _ = amp_settings(rt.amp, d.device)
    mem = probe_step_memory(student.to(d.device), student.layout.input_shape, d.device, amp_dtype)
    batch, note = fit_batch_size(rt.batch_size, explicit, mem, available_bytes(d.device), d.device.type)
    if d.enabled:
        batch = int(-d.all_reduce([-float(batch)], op="max")[0])
    if note:
        reporter.line(note)
    return with_overrides(recipe, batch_size=batch) if batch != rt.batch_size else recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _ema(student, retrain):
    if not retrain.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(student, decay=retrain.ema_decay)


def new_state(student, teacher, recipe, spec, d, stop, *, log_every: int, no_aug: bool):
    """Loaders first (their errors are cheap), then student, teacher, optimizer, schedule."""
    rt, layout = recipe.retrain, student.layout  # ``student``: from make_student
    pin = d.device.type == "cuda"
    common = dict(num_workers=rt.num_workers, world_size=d.world_size, rank=d.rank, pin_memory=pin)
    train_loader = build_train_loader(spec, layout.img_size, rt, batch_size=rt.batch_size, seed=rt.seed, no_aug=no_aug, **common)
    val_loader = build_eval_loader(spec, layout.img_size, rt.eval_crop_pct, batch_size=rt.batch_size, **common)
    student = student.to(d.device)
    teacher = prepare_teacher(teacher, d.device)
    amp_dtype, use_scaler, _ = amp_settings(rt.amp, d.device)
    mixup = build_mixup(rt, layout.num_classes)
    scale = scaled_lr(1.0, rt.batch_size, d.world_size)  # global batch / 512
    optimizer = build_optimizer(student, rt.lr * scale, rt.weight_decay)
    state = TrainState(
        model=d.wrap(student), student=student, teacher=teacher if rt.distill else None,
        criterion=build_criterion(rt, mixup is not None, rt.distill), optimizer=optimizer,
        scheduler=build_scheduler(optimizer, rt, len(train_loader), scale), dist=d,
        scaler=torch.amp.GradScaler("cuda") if use_scaler else None, ema=_ema(student, rt), mixup=mixup,
        amp_dtype=amp_dtype, clip_grad=rt.clip_grad, log_every=log_every, stop=stop, epochs=rt.epochs,
    )
    return state, (train_loader, val_loader), teacher


def describe(state: TrainState, recipe, steps: int) -> str:
    rt, d = recipe.retrain, state.dist
    _, _, amp = amp_settings(rt.amp, d.device)
    procs = f" x {d.world_size} processes" if d.enabled else ""
    return (
        f"re-training {recipe.name}: {rt.epochs} epoch(s) x {steps} steps, batch {rt.batch_size}{procs}, "
        f"lr {scaled_lr(rt.lr, rt.batch_size, d.world_size):.3g} (base {rt.lr:g} per 512), {amp}, "
        f"distillation {'on' if rt.distill else 'off'}, {d.device}{_threads(d.device)}"
    )


def _threads(device: torch.device) -> str:
    return f" ({torch.get_num_threads()} thread(s))" if device.type == "cpu" else ""


def restore_state(state: TrainState, ckpt: dict, recipe, run: RunLog, reporter, path: Path, *, steps: int,
                  samples: int, changed: dict | None = None) -> tuple[int, tuple[float, int]]:
    """Load a checkpoint into ``state`` and ``run``; returns where the interrupted epoch
    resumes (batches done, (loss sum, rank-batches)). ``steps``: batches per epoch now;
    ``samples``: training samples per process and epoch. ``changed["batch_size"] = (old, new)``:
    the schedule is the one rebuilt for the new batch (lr rescaled, new steps per epoch), set to
    the same point of the run, and the interrupted epoch continues after the images it had done
    (rounded down to a whole new batch)."""
    state.student.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None and ckpt.get("ema"):
        state.ema.module.load_state_dict(ckpt["ema"])
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step"])
    run.history, run.baseline = list(ckpt["history"]), dict(ckpt["baseline"])
    run.best_top1, run.best_epoch, run.elapsed = float(ckpt["best_top1"]), int(ckpt["best_epoch"]), float(ckpt["elapsed"])
    restore_rng(ckpt["rng"][state.dist.rank])  # same world size: checked by load_resume
    start = int(ckpt.get("step_in_epoch", 0))
    if changed and "batch_size" in changed:
        old, new = changed["batch_size"]
        start = start * old // new
        state.step = state.epoch * steps + start
        reporter.line(_rescale_line(recipe, old, new, state.dist.world_size, samples // old, steps))
    else:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scheduler.step_update(state.step)  # the lr of the step the run continues at
    where = f"step {start} of epoch {state.epoch + 1}" if start else f"the end of epoch {state.epoch}"
    reporter.line(f"resuming {path} from {where} ({state.epochs} epochs planned)")
    if state.dist.is_main:
        _write_log(path.parent, run)  # drop lines a killed run wrote after its last checkpoint
    loss_sum, batches = ckpt.get("epoch_loss", (0.0, 0))
    return start, (float(loss_sum), int(batches))


def _rescale_line(recipe, old: int, new: int, world: int, old_steps: int, new_steps: int) -> str:
    rt = recipe.retrain
    return (
        f"batch {new} instead of the checkpoint's {old}: lr {scaled_lr(rt.lr, old, world):.3g} -> "
        f"{scaled_lr(rt.lr, new, world):.3g} (base {rt.lr:g} per 512, scaled linearly), {old_steps} -> {new_steps} steps "
        "per epoch; the interrupted epoch continues after the images it had done"
    )


def save_training_checkpoint(out: Path, state: TrainState, recipe, run: RunLog, *, step_in_epoch: int = 0,
                             epoch_loss: tuple[float, int] = (0.0, 0)) -> None:
    """Collective (every rank's RNG state is gathered); rank 0 writes ``checkpoint.pt``."""
    from ..recipes import recipe_to_dict

    rng = state.dist.gather(capture_rng())
    if not state.dist.is_main:
        return
    save_checkpoint(out / CHECKPOINT, {
        "model": state.student.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": state.epoch, "step": state.step, "step_in_epoch": step_in_epoch,
        "epoch_loss": [float(epoch_loss[0]), int(epoch_loss[1])], "sampler_epoch": state.epoch,
        **run.state_dict(), "rng": rng, "recipe": recipe_to_dict(recipe), "arch": state.student.source(),
        "world_size": state.dist.world_size,
    })


def _write_log(out: Path, run: RunLog) -> None:
    atomic_write_text(out / LOG, "".join(json.dumps(r) + "\n" for r in run.history))


def _extra(run: RunLog, recipe) -> dict:
    last = run.history[-1] if run.history else {}
    return {
        "retrained_epochs": int(last.get("epoch", 0)), "planned_epochs": recipe.retrain.epochs,
        "val_top1": last.get("val_top1"), "val_top5": last.get("val_top5"), "val_loss": last.get("val_loss"),
        "best_top1": run.best_top1, "best_epoch": run.best_epoch, "baseline": run.baseline,
    }


def save_outputs(out: Path, state: TrainState, recipe, run: RunLog, *, best: bool) -> None:
    """End of an epoch: ``best.pt`` (first: the checkpoint must never name a best epoch whose
    file is missing), ``checkpoint.pt``, then ``log.jsonl`` rewritten from the history."""
    from ..convert import save_compressed

    if best and state.dist.is_main:
        save_compressed(state.student, out / BEST, extra=_extra(run, recipe))
    save_training_checkpoint(out, state, recipe, run)
    if state.dist.is_main:
        _write_log(out, run)


def finish(out: Path, state: TrainState, recipe, run: RunLog, reporter) -> FitResult:
    """``compressed.pt``, ``summary.md`` and the summary table (rank 0)."""
    from ..convert import save_compressed

    last = run.history[-1]
    final = {"top1": last["val_top1"], "top5": last["val_top5"], "loss": last["val_loss"]}
    if state.dist.is_main:
        save_compressed(state.student, out / COMPRESSED, extra=_extra(run, recipe))
        rows = summary_rows(state.student, recipe, run.baseline, final, (run.best_top1, run.best_epoch))
        d = state.dist
        note = f"{len(run.history)} epoch(s), batch {recipe.retrain.batch_size} x {d.world_size} process(es) on {d.device}"
        write_summary(out / SUMMARY, rows, recipe_name=recipe.name, wall_time=run.elapsed, note=note)
        if reporter.enabled:
            print_summary(reporter.console, rows, recipe_name=recipe.name, wall_time=run.elapsed, note=note)
            reporter.line(f"wrote {out / COMPRESSED}, {BEST}, {CHECKPOINT}, {LOG}, {SUMMARY}")
    state.dist.barrier()
    return FitResult(
        out_dir=str(out), recipe=recipe, history=run.history, baseline=run.baseline, final=final,
        best_top1=run.best_top1, best_epoch=run.best_epoch, wall_time=run.elapsed, model=state.student,
    )
