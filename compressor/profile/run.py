"""Profile a compressed model against its baseline: speed per execution backend and batch size,
merge overhead, FLOPs, parameters, tokens per layer and (with data) accuracy.

:func:`run_profile` resolves the models from a checkpoint (or a registry name), calls
:func:`profile_models` and writes ``report.json``, ``report.md`` and the plots. Every model is a
converted ``GraphModule`` (the baseline is the same weights converted with the ``none`` recipe,
which computes exactly what the plain model computes), so all of them run the same code path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from .. import ops
from ..convert import ConvertedModel, convert, unmerged
from ..errors import RmeetoError
from ..flops import count_flops
from ..loading import as_factory, load_model
from ..merge import inference_merge_impl, set_merge_impl
from ..merge.schedule import reduction_ratio, tokens_per_layer
from ..models import create_model, set_backend
from .hardware import hardware_info
from .overhead import hook_overhead, sliced_variant
from .settings import DTYPES, MIN_REPEATS, OVERHEAD_METHODS, ProfileSettings
from .stats import latencies_within_noise
from .timing import close_cache, time_backend

__all__ = ["DTYPES", "OVERHEAD_METHODS", "REPORT_VERSION", "ProfileInterrupted", "ProfileSettings", "ProfileTarget",
           "load_targets", "profile_models", "run_profile"]

REPORT_VERSION = 2  # 2: timing spread (quartiles), within-noise flags, accuracy in the timed dtype, interrupted

METHODS = {
    "timing": ("warm-up calls, then forward calls back to back on one random batch (CPU default: as many as fit "
               "the time budget after one warm-up call, 3 to 30); CUDA: CUDA events around each call and one "
               "synchronize at the end (steady-state time per batch), CPU: perf_counter per call; latency = median, "
               "quartiles (q1, q3), min, max and p90 of the per-call times; throughput = batch / median time; "
               "throughput_sustained = batch * repeats / (first start .. last end)"),
    "noise": ("two medians are within noise of each other when their interquartile ranges overlap: a speed-up or a "
              "sliced merge overhead flagged within_noise is not a measured difference; a hooks overhead is within "
              "noise when its call-to-call IQR is wider than its median"),
    "memory": "CUDA: torch.cuda.max_memory_allocated over the timed calls (weights, input, graph pool, activations); CPU: null",
    "dtype": "weights and inputs cast to the dtype (model.to(dtype)), no autocast; onnxruntime runs an fp32 copy on the CPU",
    "accuracy": ("in the timed dtype (weights and inputs cast, as timed) and in fp32 beside it, on the device, "
                 "compressor.engine's evaluate (as `rmeeto eval`): resize img_size / crop_pct bicubic, center crop"),
    "graph": "the whole forward captured in one torch.cuda.CUDAGraph with a static input buffer; replay timed",
    "merge_overhead": ("sliced: (t_merged - t_sliced) / t_merged, where the sliced model replaces every merge by "
                       "keeping the first tokens_out tokens (same token counts, zero-cost views), same backend and "
                       "batch; hooks (eager): time inside the merge modules / forward time, synchronised forward hooks"),
    "flops": ("gflops: multiply-adds (1 MAC = 1 FLOP) of both scan directions under the real merge schedule; "
              "gflops_paper: the paper's convention (one scan direction, N - num_prune at every merge layer, no cap); "
              "the baseline's paper number counts no merge layers (the paper's 1.45 / 5.08 / 18.87 G)"),
}


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during a profile: ``report`` holds what was measured so far (``interrupted: true``);
    :func:`run_profile` has written it when it raises this."""

    def __init__(self, report: dict):
        super().__init__("profile interrupted")
        self.report = report


@dataclass
class ProfileTarget:
    """One model to profile: a :class:`~compressor.convert.ConvertedModel`."""

    name: str
    module: ConvertedModel
    role: str  # "baseline", "compressed" or "training-free"
    source: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# which models


def _as_converted(m, recipe: str = "none") -> ConvertedModel:
    return m if isinstance(m, ConvertedModel) else convert(m.eval(), recipe)


def load_targets(ckpt: str | os.PathLike | None = None, *, baseline: str | os.PathLike | None = None,
                 recipes: tuple[str, ...] | list[str] = (), model: str | None = None,
                 family: str | None = None, factory=None) -> list[ProfileTarget]:
    """The models :func:`run_profile` compares, baseline first (``factory``: the model class of a
    foreign model, see :func:`compressor.loading.load_model`).

    - ``ckpt`` compressed (rmeeto file): it, and as baseline the same weights converted with
      ``none`` (or the ``baseline`` checkpoint).
    - ``ckpt`` official: the plain model as baseline, plus one training-free merged model per
      recipe in ``recipes``.
    - ``model`` (a registry name, random weights): as an official checkpoint, for speed only.
    """
    if (ckpt is None) == (model is None):
        raise RmeetoError("pass either a checkpoint or a model name (--model NAME), not both and not neither")
    fam = family or "vim"
    compressed = None
    if model is not None:
        net, source = create_model(model).eval(), f"random weights ({model})"
    else:
        loaded, source = load_model(ckpt, family=fam, factory=factory), str(ckpt)
        if not isinstance(loaded, ConvertedModel):
            net = loaded.eval()
        else:
            compressed, net = loaded, unmerged(loaded)
    targets = [_baseline_target(net, source, compressed, baseline, fam, factory)]
    if compressed is not None:
        extra = getattr(compressed, "extra", None) or {}
        src = extra.get("source_checkpoint") or extra.get("source")
        notes = []
        if src:
            epochs = extra.get("retrain_epochs")
            notes.append(f"made from {src}" + (f", re-trained {epochs} epoch(s)" if epochs else ""))
            if baseline is None:
                notes.append(f"baseline = these weights without merging; pass --baseline {src} to compare with the original model")
        targets.append(ProfileTarget(Path(ckpt).stem, compressed, "compressed", source, notes))
    for r in recipes:
        gm = convert(net, r)
        targets.append(ProfileTarget(gm.recipe.name, gm, "training-free", f"{source} + recipe {gm.recipe.name} (no re-training)"))
    _unique_names(targets)
    return targets


def _baseline_target(net, source, compressed, baseline, family, factory) -> ProfileTarget:
    if baseline is None:
        why = "the compressed weights converted with recipe none" if compressed is not None else "recipe none"
        return ProfileTarget("baseline", _as_converted(net), "baseline", f"{source} ({why})")
    gm = _as_converted(load_model(baseline, family=family, factory=factory))
    mine = _as_converted(net).layout
    notes = []
    if gm.layout.input_shape != mine.input_shape or gm.layout.embed_dim != mine.embed_dim:
        notes.append(f"baseline architecture differs (input {gm.layout.input_shape}, dim {gm.layout.embed_dim} vs "
                     f"input {mine.input_shape}, dim {mine.embed_dim}): speed-ups compare different models")
    return ProfileTarget("baseline", gm, "baseline", str(baseline), notes)


def _unique_names(targets: list[ProfileTarget]) -> None:
    seen: dict[str, int] = {}
    for t in targets:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        if n:
            t.name = f"{t.name}-{n + 1}"


# --------------------------------------------------------------------------------------------
# what does not need timing


def _static_info(t: ProfileTarget) -> dict:
    gm, cfg, layout, steps = t.module, t.module.cfg, t.module.layout, t.module.steps
    recipe = gm.recipe
    flops = count_flops(cfg, steps, merge=recipe.merge if steps else None) if cfg is not None else None
    arch = {k: getattr(cfg, k) for k in ("family", "embed_dim", "depth", "img_size", "patch_size", "stride", "num_classes")} \
        if cfg is not None else {"family": "foreign", "embed_dim": layout.embed_dim, "depth": layout.depth,
                                 "input_shape": list(layout.input_shape), "num_classes": layout.num_classes}
    return {
        "name": t.name,
        "role": t.role,
        "source": t.source,
        "recipe": recipe.name,
        "arch": arch | {"tokens": layout.num_tokens, "cls_index": layout.cls_index},
        "params": sum(p.numel() for p in gm.parameters()),
        "flops": {
            "gflops": flops["gflops_both"],
            "gflops_paper": flops["gflops_paper"],
            "convention": "both scan directions, real merge schedule, 1 multiply-add = 1 FLOP",
            "paper_convention": "one scan direction, N - num_prune per merge layer (the paper's table)",
            "breakdown": flops["breakdown_both"],
            "reduction": None,
        } if flops is not None else {"gflops": None, "gflops_paper": None, "reduction": None,
                                     "convention": "not counted: a foreign model's layers are not known to the counter"},
        "tokens_per_layer": tokens_per_layer(steps, layout.num_tokens, layout.depth),
        "merges": [{"layer": s.layer, "tokens_in": s.tokens_in, "tokens_out": s.tokens_out, "r": s.r} for s in steps],
        "reduction_ratio": reduction_ratio(steps, layout.num_tokens, layout.depth),
        "timings": [],
        "merge_overhead": [],
        "accuracy": None,
        "notes": list(t.notes),
    }


# --------------------------------------------------------------------------------------------
# timing


class _Tracker:
    """Progress in units of series (one timed model x backend x batch, or one evaluation):
    ``progress(description, done, total)`` after every forward call, so an ETA can be drawn."""

    def __init__(self, total: int, progress=None):
        self.total, self.done, self.progress = max(total, 1), 0.0, progress

    @contextlib.contextmanager
    def series(self, description: str):
        def on_call(i: int, n: int) -> None:
            if self.progress is not None:
                self.progress(description, self.done + min(i / max(n, 1), 1.0), self.total)

        on_call(0, 1)
        yield on_call
        self.done += 1  # only a finished series counts (an interrupt reports how many finished)
        on_call(0, 1)


def _timed_series(t: ProfileTarget, s: ProfileSettings) -> int:
    """How many timed series a target takes (skipped CUDA graphs on the CPU cost nothing)."""
    backends = [b for b in s.backends if not (b == "graph" and s.device != "cuda")]
    n = len(backends) * len(s.batch_sizes)
    if t.module.steps:
        if "sliced" in s.overhead:
            n += len([b for b in backends if b != "onnxruntime"]) * len(s.batch_sizes)
        if "hooks" in s.overhead and "eager" in s.backends:
            n += len(s.batch_sizes)
    return n


def _input(layout, batch: int, s: ProfileSettings) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(batch, *layout.input_shape, generator=g)
    return x.to(device=s.device, dtype=DTYPES[s.dtype])


def _time_all(module, layout, s: ProfileSettings, backends, rows: list, tracker: _Tracker, what: str, budget: float) -> list[dict]:
    """Time ``module`` per backend and batch size, appending each row to ``rows`` as it is
    measured (an interrupt keeps what was done)."""
    cache = {}
    try:
        for backend in backends:
            for bs in s.batch_sizes:
                free = backend == "graph" and s.device != "cuda"  # skipped at once: not a step of the progress
                with contextlib.nullcontext(None) if free else tracker.series(f"{what}: {backend}, batch {bs}") as on_call:
                    rows.append(time_backend(module, backend, _input(layout, bs, s), warmup=s.warmup, repeats=s.repeats,
                                             cache=cache, budget_s=budget, min_repeats=MIN_REPEATS, on_call=on_call))
    finally:
        close_cache(cache)
    return rows


def _overhead_rows(gm: ConvertedModel, name: str, merged: list[dict], s: ProfileSettings, out: list,
                   tracker: _Tracker, budget: float) -> list[dict]:
    """Merge overhead by the ``sliced`` and ``hooks`` methods (module docstring of overhead.py)."""
    if "sliced" in s.overhead:
        backends = [b for b in s.backends if b != "onnxruntime"]  # one more export per model is not worth it
        sliced = _time_all(sliced_variant(gm), gm.layout, s, backends, [], tracker, f"{name} (sliced)", budget)
        by_key = {(r["backend"], r["batch_size"]): r for r in merged}
        for r in sliced:
            m = by_key[(r["backend"], r["batch_size"])]
            if m["status"] == "skipped":
                continue
            ok = m["status"] == r["status"] and m["latency_ms_median"] and r["latency_ms_median"]
            out.append({
                "method": "sliced", "backend": r["backend"], "batch_size": r["batch_size"],
                "merged_ms": m["latency_ms_median"], "sliced_ms": r["latency_ms_median"],
                "sliced_ms_q1": r["latency_ms_q1"], "sliced_ms_q3": r["latency_ms_q3"],
                "sliced_throughput": r["throughput"], "sliced_speedup": None,
                "overhead_fraction": (m["latency_ms_median"] - r["latency_ms_median"]) / m["latency_ms_median"] if ok else None,
                "within_noise": latencies_within_noise(m, r) if ok else None,
                "note": "" if ok else (r["note"] or m["note"] or "not measured"),
            })
    if "hooks" in s.overhead and "eager" in s.backends:
        for bs in s.batch_sizes:
            with tracker.series(f"{name} (merge hooks): eager, batch {bs}") as on_call:
                row = hook_overhead(gm, _input(gm.layout, bs, s), warmup=min(s.warmup, 2), repeats=s.repeats, budget_s=budget,
                                    min_repeats=MIN_REPEATS, on_call=on_call)
            if row is not None:
                out.append(row)
    return out


def _fill_speedups(entries: list[dict]) -> None:
    """Throughput over the baseline's, same backend and batch size (the baseline is entry 0),
    flagged ``speedup_within_noise`` when the two timings' IQRs overlap."""
    base = {(r["backend"], r["batch_size"]): r for r in entries[0]["timings"]}
    base_flops = entries[0]["flops"]["gflops"]
    for i, e in enumerate(entries):
        if e["flops"]["gflops"] is not None and base_flops:
            e["flops"]["reduction"] = 1.0 - e["flops"]["gflops"] / base_flops
        for r in e["timings"]:
            b = base.get((r["backend"], r["batch_size"]))
            ok = b is not None and r["throughput"] and b["throughput"]
            r["speedup"] = r["throughput"] / b["throughput"] if ok else None
            r["speedup_within_noise"] = latencies_within_noise(r, b) if ok and i > 0 else None
        for r in e["merge_overhead"]:
            b = base.get((r["backend"], r["batch_size"]))
            if r.get("method") == "sliced":
                ok = b is not None and r["sliced_throughput"] and b["throughput"]
                r["sliced_speedup"] = r["sliced_throughput"] / b["throughput"] if ok else None


# --------------------------------------------------------------------------------------------
# the whole profile


class _CastInput(nn.Module):
    """Feeds a model cast to ``dtype`` with inputs of that dtype (as the timing does)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        return self.model(x.to(self.dtype))


def _accuracy(gm: ConvertedModel, data, s: ProfileSettings, dtype: str) -> dict:
    """Top-1 / top-5 with the engine's evaluation (the recipe's eval crop), as ``rmeeto eval``,
    with ``gm`` already cast to ``dtype``."""
    from ..engine.data import build_eval_loader, check_eval_dir
    from ..engine.loop import evaluate

    spec = check_eval_dir(data, num_classes=gm.layout.num_classes)
    crop = s.crop_pct or gm.recipe.retrain.eval_crop_pct
    loader = build_eval_loader(spec, gm.layout.img_size, crop, batch_size=s.eval_batch_size, num_workers=s.eval_workers,
                               pin_memory=s.device == "cuda")
    model = gm if dtype == "fp32" else _CastInput(gm, DTYPES[dtype])
    m = evaluate(model, loader, device=torch.device(s.device))
    return {"top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "images": m["images"],
            "classes": len(spec.classes), "split": str(spec.val), "crop_pct": crop, "dtype": dtype}


def _profile_one(t: ProfileTarget, entry: dict, s: ProfileSettings, data, tracker: _Tracker, budget: float) -> None:
    """Fill ``entry`` in place (an interrupt leaves what was measured)."""
    gm = set_backend(t.module.eval(), s.ops).to(device=s.device)
    set_merge_impl(gm, s.merge_impl)
    try:
        if data is not None:  # fp32 first, then in the timed dtype
            with tracker.series(f"{t.name}: accuracy (fp32)"):
                fp32 = _accuracy(gm, data, s, "fp32")
        gm.to(dtype=DTYPES[s.dtype])
        if data is not None:
            acc = fp32
            if s.dtype != "fp32":
                with tracker.series(f"{t.name}: accuracy ({s.dtype})"):
                    acc = _accuracy(gm, data, s, s.dtype)
            entry["accuracy"] = {**acc, "fp32": {k: fp32[k] for k in ("top1", "top5", "loss")}}
        _time_all(gm, gm.layout, s, s.backends, entry["timings"], tracker, t.name, budget)
        if entry["merges"]:
            _overhead_rows(gm, t.name, entry["timings"], s, entry["merge_overhead"], tracker, budget)
    finally:
        gm.to("cpu", dtype=torch.float32)
        if s.device == "cuda":
            torch.cuda.empty_cache()


def _collect_notes(entries: list[dict]) -> list[str]:
    """One note per (backend, status, reason), naming the models it concerns unless it is all."""
    found: dict[tuple, list[str]] = {}
    for e in entries:
        for r in e["timings"]:
            if r["note"] and r["status"] != "ok":
                names = found.setdefault((r["backend"], r["status"], r["note"]), [])
                names += [] if e["name"] in names else [e["name"]]
    everyone = len(entries)
    return [f"{backend}: {status}: {note}" + ("" if len(names) == everyone else f" ({', '.join(names)})")
            for (backend, status, note), names in found.items()]


def _threads_note(s: ProfileSettings, default_threads: int) -> list[str]:
    if s.device != "cpu" or s.threads >= default_threads:
        return []
    load = f" (load {os.getloadavg()[0]:.1f} when it started)" if hasattr(os, "getloadavg") else ""
    return [f"CPU timed with {s.threads} of {default_threads} intra-op threads{load}: --threads N to change"]


def profile_models(targets: list[ProfileTarget], settings: ProfileSettings | None = None, *,
                   data: str | os.PathLike | None = None, progress=None) -> dict:
    """Profile ``targets`` (the first is the baseline) and return the report dict.

    The models are moved to ``settings.device`` / ``dtype`` in place and left on the CPU in fp32
    afterwards. ``progress(description, done, total)`` is called after every forward call, in
    units of series (for a progress bar with an ETA). Ctrl-C raises :class:`ProfileInterrupted`
    holding the partial report."""
    if not targets:
        raise RmeetoError("nothing to profile: pass at least a baseline model")
    s = (settings or ProfileSettings()).resolved()
    torch.manual_seed(s.seed)
    timed = sum(_timed_series(t, s) for t in targets)
    tracker = _Tracker(timed + (len(targets) * (1 + (s.dtype != "fp32")) if data is not None else 0), progress)
    budget = s.time_budget_s / max(timed, 1) if s.time_budget_s else 0.0
    default_threads = torch.get_num_threads()
    entries, interrupted = [], False
    try:
        torch.set_num_threads(s.threads)
        for t in targets:
            entries.append(_static_info(t))
            _profile_one(t, entries[-1], s, data, tracker, budget)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        torch.set_num_threads(default_threads)
    _fill_speedups(entries)
    report = {
        "rmeeto_profile": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware_info(s.device) | {"torch_threads": s.threads},
        "settings": asdict(s) | {"op_backend": ops.resolve_backend(s.ops, torch.empty(0, device=s.device)),
                                 "merge_impl_used": inference_merge_impl(s.merge_impl, s.device),
                                 "data": str(data) if data is not None else None},
        "methods": METHODS,
        "baseline": entries[0]["name"],
        "models": entries,
        "interrupted": interrupted,
        "notes": _threads_note(s, default_threads) + _collect_notes(entries),
    }
    if interrupted:
        report["notes"].insert(0, f"interrupted (Ctrl-C) at {tracker.done:.0f} of {tracker.total} series: a partial report")
        raise ProfileInterrupted(report)
    return report


def run_profile(ckpt: str | os.PathLike | None = None, *, out_dir: str | os.PathLike | None = None,
                baseline: str | os.PathLike | None = None, recipes: tuple[str, ...] | list[str] = (),
                model: str | None = None, family: str | None = None, data: str | os.PathLike | None = None,
                settings: ProfileSettings | None = None, progress=None, factory=None, **overrides) -> dict:
    """Load the models (:func:`load_targets`), profile them (:func:`profile_models`) and, with
    ``out_dir``, write ``report.json``, ``report.md`` and the PNG plots there (also the partial
    report of an interrupted run, before :class:`ProfileInterrupted` goes up). ``overrides``
    are :class:`ProfileSettings` fields (``batch_sizes=(1, 8)``, ``device="cpu"``, ...)."""
    try:
        s = replace(settings or ProfileSettings(), **overrides)
    except TypeError as e:
        raise RmeetoError(f"unknown profile setting ({e})") from None
    s = s.resolved()  # fail on bad settings before loading anything
    if data is not None:
        from ..engine.data import check_eval_dir

        check_eval_dir(data)  # fail on a bad data folder before timing anything
    targets = load_targets(ckpt, baseline=baseline, recipes=recipes, model=model, family=family,
                           factory=as_factory(factory))
    try:
        report = profile_models(targets, s, data=data, progress=progress)
    except ProfileInterrupted as e:
        if out_dir is not None and e.report["models"]:
            _write(e.report, out_dir)
        raise
    if len(targets) == 1:
        report["notes"].append("only the baseline was profiled: pass --recipes (or a compressed checkpoint) to compare")
    if out_dir is not None:
        _write(report, out_dir)
    return report


def _write(report: dict, out_dir) -> None:
    from .report import write_report

    report["outputs"] = write_report(report, out_dir)
