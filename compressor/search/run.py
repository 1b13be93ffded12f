"""``run_search``: load the model, set up timing and scoring on the device, run the search, write
the found recipe (TOML), ``report.json``, ``report.md`` and ``pareto.png``."""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import ops
from .._device import resolve_device
from .._io import atomic_write_text
from ..errors import RmeetoError
from ..merge import MERGE_IMPLS, inference_merge_impl
from ..merge.schedule import MergeConfig
from ..convert import ConvertedModel, unmerged
from ..loading import load_model
from ..models import VisionMamba, create_model, set_backend
from ..profile.run import DTYPES, hardware_info
from ..recipes import Recipe, list_recipe_names, load_recipe, recipe_to_toml
from .quality import OBJECTIVES, QualityScorer, generated_calibration, load_calibration
from .space import Space
from .strategy import Candidate, Search, SearchConfig, SearchResult
from .timing import MeasuredTiming

__all__ = ["SearchSettings", "run_search", "DEFAULT_COMPARE", "REPORT_VERSION"]

REPORT_VERSION = 1
#: built-in recipes marked in the report and the plot unless ``compare`` says otherwise
DEFAULT_COMPARE = ("r014", "r028", "r031", "r042", "r056")


@dataclass(frozen=True)
class SearchSettings:
    """How to search. Exactly one target: ``target_speedup`` (over the plain model, same batch),
    ``target_latency_ms`` (median time of one forward of ``batch_size`` images) or
    ``target_recipe`` (a recipe's speed-up, measured here in the same run). ``device="auto"``:
    CUDA when available; ``dtype=None``: fp16 on CUDA, fp32 on the CPU (timing; scoring is fp32).
    ``objective=None``: ``top1`` when the calibration images carry the model's labels, else
    ``agreement``. ``max_evals``: stop after this many scored schedules (reproducible runs)."""

    target_speedup: float | None = None
    target_latency_ms: float | None = None
    target_recipe: str | None = None
    batch_size: int = 128
    device: str = "auto"
    dtype: str | None = None
    num_images: int = 512
    eval_batch_size: int = 64
    time_budget_s: float = 600.0
    max_evals: int | None = None
    seed: int = 0
    objective: str | None = None
    margin: float = 0.01
    confirm: int = 3
    warmup: int = 5
    repeats: int = 30
    part_repeats: int = 10
    ops: str = "auto"
    merge_impl: str = "auto"

    def resolved(self) -> "SearchSettings":
        if sum(t is not None for t in (self.target_speedup, self.target_latency_ms, self.target_recipe)) != 1:
            raise RmeetoError("give one target: --target-speedup (e.g. 1.35), --target-latency-ms (e.g. 8) "
                              "or --target-recipe (e.g. r031)")
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise RmeetoError(f"--target-speedup must be > 0, got {self.target_speedup}")
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise RmeetoError(f"--target-latency-ms must be > 0, got {self.target_latency_ms}")
        device = resolve_device(self.device, indexed=False, fallback="--device cpu").type
        dtype = self.dtype or ("fp16" if device == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise RmeetoError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        checks = [(self.batch_size >= 1, "--batch-size must be >= 1"), (self.num_images >= 1, "--num-images must be >= 1"),
                  (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
                  (self.time_budget_s > 0, "--time-budget must be > 0"), (self.max_evals is None or self.max_evals >= 1,
                                                                          "--max-evals must be >= 1"),
                  (0 <= self.margin < 1, "--margin must be in [0, 1)"), (self.confirm >= 1, "--confirm must be >= 1"),
                  (self.repeats >= 1 and self.part_repeats >= 1 and self.warmup >= 0, "repeats must be >= 1, warmup >= 0")]
        for ok, msg in checks:
            if not ok:
                raise RmeetoError(msg)
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise RmeetoError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.ops not in ops.BACKENDS:
            raise RmeetoError(f"unknown op backend {self.ops!r}: choose one of {', '.join(ops.BACKENDS)}")
        ops.resolve_backend(self.ops, torch.empty(0, device=device))
        if self.merge_impl not in MERGE_IMPLS:
            raise RmeetoError(f"unknown merge implementation {self.merge_impl!r}: choose one of {', '.join(MERGE_IMPLS)}")
        return replace(self, device=device, dtype=dtype)


# -------------------------------------------------------------------------------------------- inputs


def _plain_model(ckpt, model: str | None, family: str | None) -> tuple[VisionMamba, str, str]:
    """(plain model, its name, where it came from). A compressed file gives its weights unmerged."""
    if (ckpt is None) == (model is None):
        raise RmeetoError("pass either a checkpoint or a model name (--model NAME), not both and not neither")
    if model is not None:
        return create_model(model).eval(), model, f"random weights ({model}): speed only, quality is meaningless"
    loaded = load_model(ckpt, family=family or "vim")
    source = str(ckpt)
    if isinstance(loaded, ConvertedModel):
        source = f"{ckpt} (compressed with {loaded.recipe.name}; searched on its weights unmerged)"
        loaded = unmerged(loaded) if loaded.cfg is not None else loaded
    if not isinstance(loaded, VisionMamba):
        raise RmeetoError(f"{ckpt}: rmeeto search times and scores rmeeto's own Vision Mamba (official Vim/VideoMamba "
                          "checkpoints and files rmeeto compressed from them); a model built by a factory is not supported yet")
    return loaded.eval(), Path(ckpt).stem, source


def _compare(space: Space, names) -> dict[str, tuple[int, ...]]:
    names = [n for n in DEFAULT_COMPARE if n in list_recipe_names()] if names is None else list(names)
    out = {}
    for n in names:
        r = load_recipe(n)
        out[r.name] = space.from_config(r.merge)
    return out


def _recipe_name(out: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", out.stem).lstrip("._-")
    return name or "found"


# -------------------------------------------------------------------------------------------- outputs


def _cand(c: Candidate, space: Space, pareto: set[int]) -> dict:
    return {
        "index": c.index, "schedule": {str(i): r for i, r in enumerate(c.schedule) if r},
        "schedule_text": space.describe(c.schedule), "tokens_last": space.tokens(c.schedule)[-1],
        "token_reduction": 1 - sum(space.tokens(c.schedule)) / (space.depth * space.num_tokens),
        "origin": c.origin, "marks": c.marks, "predicted_ms": c.predicted_ms, "predicted_speedup": c.predicted_speedup,
        "measured_ms": c.measured_ms, "measured_speedup": c.measured_speedup, "quality": c.quality,
        "pareto": c.index in pareto,
    }


def _message(res: SearchResult, target_text: str, knob: str, batch: int, device_name: str, space_text: str = "") -> str:
    """One line. ``knob``: what to turn when no schedule meets the target ("lower --target-speedup")."""
    if res.status == "found":
        b = res.best
        return (f"found #{b.index} {{layer: tokens}} = {space_text}: measured x{b.measured_speedup:.3f} ({b.measured_ms:.3f} ms vs "
                f"{res.plain_ms_confirm:.3f} ms plain) for {target_text}, agreement {b.quality['agreement']:.1%}, "
                f"KL {b.quality['kl']:.4f}" + ("" if b.quality["top1"] is None else f", top-1 {b.quality['top1']:.1%}"))
    measured = {why: max((res.plain_ms_confirm / w["measured_ms"] for w in res.whole_timings if w["why"] == why),
                         default=float("nan")) for why in ("fastest", "confirm")}
    if res.status == "unreachable":
        return (f"no schedule reaches {target_text} at batch {batch} on {device_name}: the fastest (as many tokens "
                f"merged as the cap allows before every layer) measured x{measured['fastest']:.3f}; {knob}")
    best = measured["confirm"]
    return (f"no schedule was confirmed at {target_text}: the best finalist timed whole measured x{best:.3f} against "
            f"the goal x{res.goal_speedup:.3f} (predictions were optimistic); raise --margin or --time-budget, or {knob}")


def _description(res: SearchResult, target_text: str, st: SearchSettings, device_name: str, calib: str, objective: str) -> str:
    b = res.best
    q = b.quality
    top1 = "" if q["top1"] is None else f", top-1 {q['top1']:.2%}"
    return (f"rmeeto search (seed {st.seed}) for {target_text} at batch {st.batch_size} on {device_name} "
            f"({st.dtype}): measured x{b.measured_speedup:.3f} ({b.measured_ms:.3f} ms vs {res.plain_ms_confirm:.3f} ms "
            f"plain); training-free top-1 agreement {q['agreement']:.2%}, KL {q['kl']:.4f}{top1} on {calib}; "
            f"objective {objective}.")


# -------------------------------------------------------------------------------------------- run


@dataclass
class _Target:
    text: str  # "x1.35", "8 ms per batch", "the speed of r031"
    knob: str  # what to turn when it is out of reach
    schedule: tuple[int, ...] | None = None


def _target(s: SearchSettings, space: Space) -> _Target:
    if s.target_speedup is not None:
        return _Target(f"x{s.target_speedup:g}", "lower --target-speedup")
    if s.target_latency_ms is not None:
        return _Target(f"{s.target_latency_ms:g} ms per batch", "raise --target-latency-ms")
    recipe = load_recipe(s.target_recipe)
    return _Target(f"the speed of {recipe.name}", "pick a slower --target-recipe", space.from_config(recipe.merge))


def _calibration(data, s: SearchSettings, cfg, base: Recipe, notes: list[str]):
    if data is not None:
        return load_calibration(data, s.num_images, cfg.img_size, base.retrain.eval_crop_pct, cfg.num_classes, seed=s.seed)
    calib = generated_calibration(s.num_images, cfg.in_chans, cfg.img_size, seed=s.seed)
    notes.append(f"no --data: quality scored on {calib.source}, which says how much merging changes the outputs, "
                 "not how accurate the model stays on real images")
    return calib


def run_search(ckpt: str | os.PathLike | None = None, *, out: str | os.PathLike = "found.toml",
               report_dir: str | os.PathLike | None = None, model: str | None = None, family: str | None = None,
               data: str | os.PathLike | None = None, compare: list[str] | None = None,
               base_recipe: str | os.PathLike | None = None, settings: SearchSettings | None = None,
               progress=None, clock=time.monotonic) -> dict:
    """Search (module :mod:`compressor.search.strategy`) and write the found recipe to ``out``
    (when one meets the target) and the report to ``report_dir`` (default ``<out stem>_report/``
    beside ``out``). Returns the report dict; its ``status`` is ``found``, ``unreachable`` or
    ``unconfirmed`` and ``message`` says so in one line. ``progress(phase, fraction, message)``."""
    s = (settings or SearchSettings()).resolved()
    out = Path(out)
    if out.suffix != ".toml":
        raise RmeetoError(f"-o {out}: the found recipe is a .toml file; name it e.g. found.toml")
    report_dir = Path(report_dir) if report_dir is not None else out.with_name(f"{out.stem}_report")
    base = load_recipe(base_recipe) if base_recipe is not None else Recipe(name="base")
    net, model_name, source = _plain_model(ckpt, model, family)
    cfg, m = net.cfg, base.merge
    space = Space(cfg.num_tokens, cfg.cls_index, cfg.depth, mode=m.mode, ordered=m.ordered, distance=m.distance)
    compare_schedules, target = _compare(space, compare), _target(s, space)  # bad recipe names fail here, early
    notes = [] if model is None else [source]
    if progress is not None:
        progress("setup", 0.0, "loading calibration images and scoring the plain model")
    calib = _calibration(data, s, cfg, base, notes)
    objective = s.objective or ("top1" if calib.labels is not None else "agreement")
    if objective == "top1" and calib.labels is None:
        raise RmeetoError("--objective top1 needs labelled images: pass --data with the model's classes, or use agreement")
    net = set_backend(net, s.ops).to(s.device)
    scorer = QualityScorer(net, space, calib, device=s.device, batch_size=s.eval_batch_size, ops=s.ops, merge_impl=s.merge_impl)
    timing = MeasuredTiming(net, space, batch_size=s.batch_size, device=s.device, dtype=DTYPES[s.dtype],
                            backend="graph" if s.device == "cuda" else "eager", warmup=s.warmup, repeats=s.repeats,
                            part_repeats=s.part_repeats, ops=s.ops, merge_impl=s.merge_impl, seed=s.seed)
    _preflight(scorer, timing, space, s)
    search_cfg = SearchConfig(required_speedup=s.target_speedup, latency_ms=s.target_latency_ms,
                              target_schedule=target.schedule, objective=objective, seed=s.seed, budget_s=s.time_budget_s,
                              max_evals=s.max_evals, margin=s.margin, confirm=s.confirm)
    res = Search(space, timing, scorer, search_cfg, compare=compare_schedules, clock=clock, progress=progress).run()
    if target.schedule is not None:
        target.text += f" (x{res.required_speedup:.3f} measured here)"
    report = _report(res, s, space, timing, target, objective, calib.source, notes,
                     {"name": model_name, "source": source, "tokens": cfg.num_tokens, "depth": cfg.depth,
                      "cls_index": cfg.cls_index, "embed_dim": cfg.embed_dim, "img_size": cfg.img_size},
                     {"data": None if data is None else str(data), "base_recipe": base.name})
    if res.best is not None:
        desc = _description(res, target.text, s, report["hardware"]["device_name"], calib.source, objective)
        recipe = Recipe(name=_recipe_name(out), description=desc, merge=space.config(res.best.schedule), retrain=base.retrain)
        atomic_write_text(out, recipe_to_toml(recipe))
        report["recipe"] = str(out)
    from .report import write_report

    write_report(report, report_dir)
    return report


def _report(res: SearchResult, s: SearchSettings, space: Space, timing: MeasuredTiming, target: _Target, objective: str,
            calib_source: str, notes: list[str], model: dict, extra_settings: dict) -> dict:
    """The report dict (``report.json``; :mod:`compressor.search.report` renders it)."""
    hw = hardware_info(s.device)
    cands = [_cand(c, space, set(res.pareto)) for c in res.candidates]
    return {
        "rmeeto_search": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw,
        "settings": asdict(s) | {"op_backend": ops.resolve_backend(s.ops, torch.empty(0, device=s.device)),
                                 "merge_impl_used": inference_merge_impl(s.merge_impl, s.device)} | extra_settings,
        "timing_backend": timing.backend, "model": model, "calibration": calib_source, "objective": objective,
        "target_text": target.text,
        "target": {"speedup": s.target_speedup, "latency_ms": s.target_latency_ms, "recipe": s.target_recipe,
                   "required_speedup": res.required_speedup, "goal_speedup": res.goal_speedup, "margin": s.margin},
        "status": res.status,
        "message": _message(res, target.text, target.knob, s.batch_size, hw["device_name"],
                            space.describe(res.best.schedule) if res.best else ""),
        "stopped": res.stopped, "evals": res.evals, "elapsed_s": res.elapsed_s, "plain_ms": res.plain_ms,
        "plain_ms_confirm": res.plain_ms_confirm, "alpha": res.alpha,
        "best": None if res.best is None else cands[res.best.index], "recipe": None,
        "candidates": cands, "comparisons": res.comparisons, "whole_timings": res.whole_timings,
        "timing_table": timing.table(), "timing_rows": timing.rows, "measure_s": timing.measure_s,
        "notes": notes,
    }


def _preflight(scorer: QualityScorer, timing: MeasuredTiming, space: Space, s: SearchSettings) -> None:
    """Stop early, with the knob to turn, when the budget cannot hold a useful search here. The
    first scoring and block timing carry one-off costs (kernel compilation, CUDA graph pools),
    so the second of each is what counts."""
    score_s = scorer(space.plain())["seconds"]
    if score_s * 10 > s.time_budget_s:
        raise RmeetoError(
            f"scoring one schedule takes {score_s:.1f} s here ({len(scorer.images)} images on {s.device}): fewer "
            f"than 10 fit in --time-budget {s.time_budget_s:.0f}s; lower --num-images or raise --time-budget"
        )
    timing.block_ms(space.num_tokens)
    per_length = float("inf")
    for n in (space.num_tokens - 1, space.num_tokens - 2):  # the faster of two new lengths: one may
        if n < 1:                                           # compile (Triton specialises lengths
            break                                           # divisible by 16), once per search
        t0 = time.perf_counter()
        timing.block_ms(n)
        per_length = min(per_length, time.perf_counter() - t0)
    if per_length * space.num_tokens > 0.5 * s.time_budget_s:
        raise RmeetoError(
            f"timing one block takes {per_length:.1f} s here (batch {s.batch_size} on {s.device}); the up to "
            f"{space.num_tokens} lengths a search may need would take more than half of --time-budget "
            f"{s.time_budget_s:.0f}s: lower --batch-size or --part-repeats, or raise --time-budget"
        )
