"""Recovery re-training (nanoGPT-style): :func:`fit` calls :func:`train_one_epoch` and
:func:`evaluate`; :func:`train_step` is one optimizer step.

The student (merged, all parameters trainable) learns from the mixed targets and from the
unmerged teacher's logits on the same augmented batch. Everything a resume needs is in
``OUT/checkpoint.pt`` (see :mod:`compressor.engine.checkpoint`); ``OUT/compressed.pt`` and
``OUT/best.pt`` are loadable with :func:`compressor.load_model`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RmeetoError
from .._io import make_out_dir
from ._build import lr_warning, make_student
from ._cpu import cpu_threads
from ._progress import Reporter, StopFlag, fmt_rate
from ._setup import (CHECKPOINT, check_out_dir, describe, finish, fit_batch_to_memory, load_resume, new_state,
                     restore_state, save_outputs, save_training_checkpoint, seed_everything)
from ._state import FitResult, RunLog, TrainState
from .data import auto_num_workers, check_data_dir
from .distributed import Dist

__all__ = [
    "fit", "train_one_epoch", "evaluate", "train_step", "TrainState", "RunLog", "FitResult", "EpochResult",
    "TrainingInterrupted", "NonFiniteLoss",
]


class TrainingInterrupted(RmeetoError):
    """Ctrl-C / SIGTERM: a checkpoint was saved (or, on a second Ctrl-C, the last one kept)."""


class NonFiniteLoss(RmeetoError):
    """The loss became NaN/inf: training stopped, the last good checkpoint is kept."""


@dataclass
class EpochResult:
    loss: float  # mean training loss of the epoch (all ranks)
    lr: float  # lr after the last step
    images_per_s: float  # training throughput, all ranks together
    seconds: float
    done: int  # batches done in this epoch
    loss_sum: float = 0.0  # raw sums, kept when an epoch is interrupted
    batches: int = 0
    interrupted: bool = False


def train_step(state: TrainState, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss (detached, still on the device)."""
    images = images.to(state.device, non_blocking=True)
    targets = targets.to(state.device, non_blocking=True)
    if state.mixup is not None:
        images, targets = state.mixup(images, targets)  # soft targets with label smoothing
    with state.autocast():
        teacher_logits = None
        if state.teacher is not None:
            with torch.no_grad():  # same augmented batch, no graph kept
                teacher_logits = state.teacher(images)
        loss = state.criterion(state.model(images), targets, teacher_logits)

    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:  # fp16: scale the loss so small gradients do not underflow
        state.scaler.scale(loss).backward()
        if state.clip_grad > 0:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(state.model.parameters(), state.clip_grad)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        if state.clip_grad > 0:
            nn.utils.clip_grad_norm_(state.model.parameters(), state.clip_grad)
        state.optimizer.step()
    state.step += 1
    state.scheduler.step_update(state.step)  # per-step cosine schedule
    if state.ema is not None:
        state.ema.update(state.student, step=state.step)
    return loss.detach()


def _agree(state: TrainState, loss_sum: torch.Tensor, batches: int) -> tuple[float, int, bool]:
    """Sync point (loss to host; one all-reduce when distributed): the global loss sum and
    batch count, and whether any rank was asked to stop. Every rank gets the same answer, so
    all stop, or fail on a NaN, at the same step."""
    total, n, stop = state.dist.all_reduce([loss_sum.item(), float(batches), float(state.stop.requested)])
    return total, int(n), stop > 0


def train_one_epoch(state: TrainState, loader, epoch: int, *, reporter: Reporter, steps: int,
                    start: int = 0, carry: tuple[float, int] = (0.0, 0)) -> EpochResult:
    """Train over ``loader`` (its sampler already set to ``epoch`` and to skip ``start``
    batches). ``carry``: loss sum and batch count of an interrupted epoch's first part.
    Stops early, with ``interrupted=True``, when Ctrl-C / SIGTERM was received."""
    state.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=state.device)  # summed on device: no per-step sync
    done, mine = start, 0
    world_batch = loader.batch_size * state.dist.world_size
    total, n, stop = carry[0], carry[1], False
    reporter.start_epoch(epoch, state.epochs, steps, start)
    t0 = last = time.perf_counter()
    for images, targets in loader:
        loss_sum += train_step(state, images, targets)
        done, mine = done + 1, mine + 1
        # the local stop flag (and the clock: ranks would disagree) is only acted on at agreed
        # points when several ranks run; one process also reports every reporter.interval_s
        alone = not state.dist.enabled
        due = alone and (state.stop.requested or time.perf_counter() - last >= reporter.interval_s)
        if done % state.log_every == 0 or done == steps or due:
            last = time.perf_counter()
            part, count, stop = _agree(state, loss_sum, mine)
            total, n = carry[0] + part, carry[1] + count  # n counts rank-batches
            if not math.isfinite(total):
                reporter.end_epoch()
                raise NonFiniteLoss(f"the loss became {total} at epoch {epoch + 1}, step {done}/{steps}")
            reporter.update(done, total / max(n, 1), state.lr, mine * world_batch / (time.perf_counter() - t0))
            if stop:
                break
    seconds = time.perf_counter() - t0
    reporter.end_epoch()
    return EpochResult(
        loss=total / max(n, 1), lr=state.lr, images_per_s=mine * world_batch / max(seconds, 1e-9), seconds=seconds,
        done=done, loss_sum=total, batches=n, interrupted=stop and done < steps,
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, amp_dtype: torch.dtype | None = None,
             dist: Dist | None = None) -> dict:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and images/s of ``model`` on ``loader``
    (each rank its shard; sums reduced over ranks). Restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, images
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == targets[:, None]
        sums += torch.stack([
            hit[:, 0].sum(), hit.any(dim=-1).sum(), F.cross_entropy(logits, targets, reduction="sum"),
            torch.tensor(len(targets), device=device),
        ]).double()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    dist = dist or Dist(device=device)
    c1, c5, loss, n = dist.all_reduce(sums.tolist())  # sync point, once per evaluation
    seconds = dist.all_reduce([seconds], op="max")[0]
    n = max(n, 1)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "images": int(n),
            "images_per_s": n / max(seconds, 1e-9)}


# --------------------------------------------------------------------------------------------
# fit


def fit(student, teacher, recipe, data_dir, out_dir, *, epochs=None, batch_size=None, lr=None, device=None,
        resume=False, distill=None, seed=None, num_workers=None, log_every=20, no_aug=False, console=None) -> FitResult:
    """Re-train the merged ``student`` from the unmerged ``teacher`` on ``data_dir`` into ``out_dir``.

    ``student``: a model converted with ``recipe`` (or None: converted here from ``teacher``);
    ``teacher``: the pretrained model. Keyword arguments that are not None override the
    recipe's ``[retrain]`` values (command line > recipe > default; ``lr`` is the base lr for
    a global batch of 512; without ``num_workers`` the recipe's count is capped to the cores,
    :func:`~compressor.engine.data.auto_num_workers`; without ``batch_size`` the recipe's batch
    is lowered when its step would not fit in memory, :mod:`compressor.engine._memory`).
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or None (auto; under torchrun ``cuda:LOCAL_RANK``). ``resume``: continue ``out_dir/checkpoint.pt``. ``no_aug``:
    deterministic resize + crop instead of the DeiT augmentation (debugging, tests).

    Raises :class:`RmeetoError` for bad inputs (before any work), :class:`NonFiniteLoss` and
    :class:`TrainingInterrupted` (checkpoint saved; continue with ``resume=True``).
    """
    from ..recipes import Recipe, load_recipe, with_overrides
    from .distributed import init_distributed

    # command line > recipe > default: with_overrides keeps the recipe's value for None
    recipe = with_overrides(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), epochs=epochs, batch_size=batch_size, lr=lr, distill=distill, seed=seed,
                            num_workers=num_workers)
    if num_workers is None:  # not asked for: the recipe's count is a ceiling, sized to this machine's cores
        recipe = with_overrides(recipe, num_workers=auto_num_workers(recipe.retrain.num_workers))
    from ..convert import ConvertedModel

    if not isinstance(teacher, torch.nn.Module) or isinstance(teacher, ConvertedModel):
        raise RmeetoError("fit needs the pretrained, unmerged model as teacher (from load_model, create_model or your own "
                          "Vision Mamba)")
    d = init_distributed(device)
    reporter = Reporter(enabled=d.is_main, console=console)
    try:
        with reporter, StopFlag(reporter) as stop, cpu_threads(d.device):
            return _fit(student, teacher, recipe, data_dir, out_dir, d, reporter, stop, resume=resume,
                        log_every=max(1, log_every), no_aug=no_aug, explicit_batch=batch_size is not None)
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"aborted by a second Ctrl-C without saving: {out_dir}/{CHECKPOINT} keeps the last complete checkpoint; "
            "continue with --resume"
        ) from None
    finally:
        d.close()


def _fit(student, teacher, recipe, data_dir, out_dir, d, reporter, stop, *, resume, log_every, no_aug,
         explicit_batch) -> FitResult:
    # every check first (data, output folder, resume, loaders), the output folder created after
    student = make_student(student if student is not None else teacher, recipe)
    spec = check_data_dir(data_dir, num_classes=student.layout.num_classes)
    out = check_out_dir(out_dir, resume)
    ckpt, changed = load_resume(out / CHECKPOINT, recipe, student.source(), d.world_size) if resume else (None, {})
    if ckpt is not None and not explicit_batch and "batch_size" in changed:
        from ..recipes import with_overrides  # no --batch-size: the run keeps its own batch (maybe fitted to the memory)

        recipe = with_overrides(recipe, batch_size=changed.pop("batch_size")[0])
    # the batch against the memory, before any loader or step; a resumed run's batch is as if asked for
    recipe = fit_batch_to_memory(student, recipe, d, explicit=explicit_batch or ckpt is not None, reporter=reporter)
    state, (train_loader, val_loader), teacher = new_state(student, teacher, recipe, spec, d, stop,
                                                           log_every=log_every, no_aug=no_aug)
    if d.is_main:
        make_out_dir(out)
    d.barrier()
    steps = len(train_loader)
    reporter.line(describe(state, recipe, steps))
    warning = lr_warning(recipe.retrain, d.world_size)
    if warning:
        reporter.line(f"[yellow]{warning}[/yellow]")
    run, start, carry = RunLog(), 0, (0.0, 0)
    t_begin = time.perf_counter()
    if ckpt is None:
        seed_everything(recipe.retrain.seed + d.rank)
        reporter.status("evaluating the original and the merged model before re-training")
        run.baseline = {  # the summary's first two rows; stored, so a resume does not redo them
            "original": evaluate(teacher, val_loader, device=d.device, amp_dtype=state.amp_dtype, dist=d),
            "training_free": evaluate(state.student, val_loader, device=d.device, amp_dtype=state.amp_dtype, dist=d),
        }
        reporter.line(_baseline_line(run.baseline))
        save_training_checkpoint(out, state, recipe, run)  # epoch 0: a NaN in epoch 1 still leaves one
    else:
        start, carry = restore_state(state, ckpt, recipe, run, reporter, out / CHECKPOINT, steps=steps,
                                     samples=len(train_loader.sampler), changed=changed)
    t_session = t_begin - run.elapsed  # wall time accumulates over resumed sessions
    for epoch in range(state.epoch, state.epochs):
        _set_epoch(train_loader, epoch, start, recipe.retrain.seed, d.rank)
        t_epoch = time.perf_counter()
        try:
            result = train_one_epoch(state, train_loader, epoch, reporter=reporter, steps=steps, start=start, carry=carry)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(
                f"{e}: stopped without saving, {out / CHECKPOINT} keeps the last good state (epoch {state.epoch}); "
                "lower the lr, set clip_grad or amp = \"off\" in the recipe and start a new run"
            ) from None
        start, carry = 0, (0.0, 0)
        run.elapsed = time.perf_counter() - t_session
        if result.interrupted:
            save_training_checkpoint(out, state, recipe, run, step_in_epoch=result.done,
                                     epoch_loss=(result.loss_sum, result.batches))
            raise TrainingInterrupted(
                f"stopped at epoch {epoch + 1}, step {result.done}/{steps}: saved {out / CHECKPOINT}; continue with --resume"
            )
        reporter.status(f"evaluating after epoch {epoch + 1}")
        metrics = evaluate(state.student, val_loader, device=d.device, amp_dtype=state.amp_dtype, dist=d)
        record = _record(epoch, result, metrics, time.perf_counter() - t_epoch, time.perf_counter() - t_session)
        if state.ema is not None:
            ema = evaluate(state.ema.module, val_loader, device=d.device, amp_dtype=state.amp_dtype, dist=d)
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        state.epoch, run.elapsed = epoch + 1, record["elapsed_s"]
        run.history.append(record)
        improved = metrics["top1"] > run.best_top1
        if improved:
            run.best_top1, run.best_epoch = metrics["top1"], epoch + 1
        save_outputs(out, state, recipe, run, best=improved)
        reporter.line(_epoch_line(record, state.epochs))
        reporter.status("")
        if d.all_reduce([float(stop.requested)], op="max")[0] > 0:  # all ranks stop together
            raise TrainingInterrupted(f"stopped after epoch {epoch + 1}: saved {out / CHECKPOINT}; continue with --resume")
    return finish(out, state, recipe, run, reporter)


def _set_epoch(loader, epoch: int, start: int, seed: int, rank: int) -> None:
    """Data order of ``epoch`` (sampler: seed + epoch), skipping ``start`` batches of an
    interrupted epoch; worker seeds depend on (seed, epoch, rank) only, never on global RNG."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start(start * loader.batch_size)
    loader.generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def _record(epoch: int, r: EpochResult, m: dict, seconds: float, elapsed: float) -> dict:
    return {
        "epoch": epoch + 1, "train_loss": r.loss, "lr": r.lr,
        "val_top1": m["top1"], "val_top5": m["top5"], "val_loss": m["loss"],
        "images_per_s": r.images_per_s, "val_images_per_s": m["images_per_s"],
        "time_s": seconds, "elapsed_s": elapsed,
    }


def _epoch_line(rec: dict, epochs: int) -> str:
    return (
        f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f}  lr {rec['lr']:.2e}  "
        f"val top-1 {rec['val_top1']:.2f}  top-5 {rec['val_top5']:.2f}  loss {rec['val_loss']:.4f}  "
        f"{fmt_rate(rec['images_per_s'])} img/s  {rec['time_s']:.1f}s"
    )


def _baseline_line(b: dict) -> str:
    o, t = b["original"], b["training_free"]
    return (f"before re-training: original top-1 {o['top1']:.2f} top-5 {o['top5']:.2f}; "
            f"merged (training-free) top-1 {t['top1']:.2f} top-5 {t['top5']:.2f}")
