"""Profile a compressed model against its baseline: speed per execution backend and batch size,
merge overhead, FLOPs, parameters, tokens per layer and (with data) accuracy.

:func:`run_profile` resolves the models from a checkpoint (or a registry name), calls
:func:`profile_models` and writes ``report.json``, ``report.md`` and the plots. Every model is a
converted ``GraphModule`` (the baseline is the same weights converted with the ``none`` recipe,
which computes exactly what the plain model computes), so all of them run the same code path.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__, ops
from ..convert import ConvertedModel, convert, unmerged
from ..errors import RmeetoError
from ..merge import MERGE_IMPLS, inference_merge_impl, set_merge_impl
from ..merge import fast as fast_merge
from ..merge.schedule import reduction_ratio, tokens_per_layer
from ..loading import as_factory, load_model
from ..models import create_model, set_backend
from ..flops import count_flops
from .overhead import hook_overhead, sliced_variant
from .timing import EXEC_BACKENDS, close_cache, time_backend

__all__ = ["DTYPES", "REPORT_VERSION", "ProfileSettings", "ProfileTarget", "load_targets", "profile_models", "run_profile"]

REPORT_VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OVERHEAD_METHODS = ("sliced", "hooks")

METHODS = {
    "timing": ("warm-up calls, then `repeats` forward calls back to back on one random batch; CUDA: CUDA events "
               "around each call and one synchronize at the end (steady-state time per batch), CPU: perf_counter "
               "per call; latency = median and p90 of the per-call times; throughput = batch / median time; "
               "throughput_sustained = batch * repeats / (first start .. last end)"),
    "memory": "CUDA: torch.cuda.max_memory_allocated over the timed calls (weights, input, graph pool, activations); CPU: null",
    "dtype": "weights and inputs cast to the dtype (model.to(dtype)), no autocast; onnxruntime runs an fp32 copy on the CPU",
    "accuracy": "fp32 on the device, compressor.engine's evaluate (as `rmeeto eval`): resize img_size / crop_pct bicubic, center crop",
    "graph": "the whole forward captured in one torch.cuda.CUDAGraph with a static input buffer; replay timed",
    "merge_overhead": ("sliced: (t_merged - t_sliced) / t_merged, where the sliced model replaces every merge by "
                       "keeping the first tokens_out tokens (same token counts, zero-cost views), same backend and "
                       "batch; hooks (eager): time inside the merge modules / forward time, synchronised forward hooks"),
    "flops": ("gflops: multiply-adds (1 MAC = 1 FLOP) of both scan directions under the real merge schedule; "
              "gflops_paper: the paper's convention (one scan direction, N - num_prune at every merge layer, no cap); "
              "the baseline's paper number counts no merge layers (the paper's 1.45 / 5.08 / 18.87 G)"),
}


@dataclass(frozen=True)
class ProfileSettings:
    """How to measure. ``device="auto"``: CUDA when available. ``dtype=None``: fp16 on CUDA, fp32
    on the CPU. ``ops``: the op backend of :mod:`compressor.ops` (``auto`` = kernels when present).
    ``overhead``: merge-overhead methods (``sliced``, ``hooks``). ``merge_impl``: how merges run
    (:data:`compressor.merge.MERGE_IMPLS`; ``auto`` = the Triton kernels on CUDA)."""

    device: str = "auto"
    batch_sizes: tuple[int, ...] = (1, 8, 64, 128)
    dtype: str | None = None
    backends: tuple[str, ...] = ("eager", "graph")
    warmup: int = 5
    repeats: int = 30
    ops: str = "auto"
    overhead: tuple[str, ...] = OVERHEAD_METHODS
    seed: int = 0
    eval_batch_size: int = 64
    crop_pct: float | None = None  # eval center-crop fraction; None: each model's recipe (0.875 default)
    eval_workers: int = 4
    merge_impl: str = "auto"

    def resolved(self) -> "ProfileSettings":
        """Validated copy with ``device`` and ``dtype`` made concrete."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        if device not in ("cuda", "cpu"):
            raise RmeetoError(f"unknown device {device!r}: choose cuda or cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise RmeetoError("CUDA is not available on this machine: profile with --device cpu")
        dtype = self.dtype or ("fp16" if device == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise RmeetoError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        bad = [b for b in self.backends if b not in EXEC_BACKENDS]
        if bad or not self.backends:
            raise RmeetoError(f"unknown backend {bad[0] if bad else '(none)'!r}: choose from {', '.join(EXEC_BACKENDS)}")
        bad = [m for m in self.overhead if m not in OVERHEAD_METHODS]
        if bad:
            raise RmeetoError(f"unknown merge-overhead method {bad[0]!r}: choose from {', '.join(OVERHEAD_METHODS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise RmeetoError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.repeats < 1 or self.warmup < 0:
            raise RmeetoError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} / {self.warmup}")
        if self.ops not in ops.BACKENDS:
            raise RmeetoError(f"unknown op backend {self.ops!r}: choose one of {', '.join(ops.BACKENDS)}")
        ops.resolve_backend(self.ops, torch.empty(0, device=device))  # an explicit 'cuda' must be usable
        if self.merge_impl not in MERGE_IMPLS:
            raise RmeetoError(f"unknown merge implementation {self.merge_impl!r}: choose one of {', '.join(MERGE_IMPLS)}")
        if self.merge_impl == "triton" and not (fast_merge.available() and (device == "cuda" or fast_merge.interpreting())):
            raise RmeetoError("the triton merge needs CUDA and Triton: profile with --merge-impl auto or torch")
        return replace(self, device=device, dtype=dtype, batch_sizes=tuple(dict.fromkeys(self.batch_sizes)),
                       backends=tuple(dict.fromkeys(self.backends)))


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


def _input(layout, batch: int, s: ProfileSettings) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(batch, *layout.input_shape, generator=g)
    return x.to(device=s.device, dtype=DTYPES[s.dtype])


def _time_all(module, layout, s: ProfileSettings, backends) -> list[dict]:
    rows, cache = [], {}
    try:
        for backend in backends:
            for bs in s.batch_sizes:
                rows.append(time_backend(module, backend, _input(layout, bs, s), warmup=s.warmup, repeats=s.repeats, cache=cache))
    finally:
        close_cache(cache)
    return rows


def _overhead_rows(gm: ConvertedModel, merged: list[dict], s: ProfileSettings) -> list[dict]:
    """Merge overhead by the ``sliced`` and ``hooks`` methods (module docstring of overhead.py)."""
    out = []
    if "sliced" in s.overhead:
        backends = [b for b in s.backends if b != "onnxruntime"]  # one more export per model is not worth it
        sliced = _time_all(sliced_variant(gm), gm.layout, s, backends)
        by_key = {(r["backend"], r["batch_size"]): r for r in merged}
        for r in sliced:
            m = by_key[(r["backend"], r["batch_size"])]
            if m["status"] == "skipped":
                continue
            ok = m["status"] == r["status"] and m["latency_ms_median"] and r["latency_ms_median"]
            out.append({
                "method": "sliced", "backend": r["backend"], "batch_size": r["batch_size"],
                "merged_ms": m["latency_ms_median"], "sliced_ms": r["latency_ms_median"],
                "sliced_throughput": r["throughput"], "sliced_speedup": None,
                "overhead_fraction": (m["latency_ms_median"] - r["latency_ms_median"]) / m["latency_ms_median"] if ok else None,
                "note": "" if ok else (r["note"] or m["note"] or "not measured"),
            })
    if "hooks" in s.overhead and "eager" in s.backends:
        for bs in s.batch_sizes:
            row = hook_overhead(gm, _input(gm.layout, bs, s), warmup=min(s.warmup, 2), repeats=s.repeats)
            if row is not None:
                out.append(row)
    return out


def _fill_speedups(entries: list[dict]) -> None:
    """Throughput over the baseline's, same backend and batch size (the baseline is entry 0)."""
    base = {(r["backend"], r["batch_size"]): r["throughput"] for r in entries[0]["timings"]}
    base_flops = entries[0]["flops"]["gflops"]
    for e in entries:
        if e["flops"]["gflops"] is not None and base_flops:
            e["flops"]["reduction"] = 1.0 - e["flops"]["gflops"] / base_flops
        for r in e["timings"]:
            b = base.get((r["backend"], r["batch_size"]))
            r["speedup"] = r["throughput"] / b if r["throughput"] and b else None
        for r in e["merge_overhead"]:
            b = base.get((r["backend"], r["batch_size"]))
            if r.get("method") == "sliced":
                r["sliced_speedup"] = r["sliced_throughput"] / b if r["sliced_throughput"] and b else None


# --------------------------------------------------------------------------------------------
# the whole profile


def hardware_info(device: str) -> dict:
    """Where the numbers were measured."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort_version,
        "kernels": ops.kernels_available(),
        "rmeeto": __version__,
    }
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accuracy(gm: ConvertedModel, data, s: ProfileSettings) -> dict:
    """Top-1 / top-5 with the engine's evaluation (fp32, the recipe's eval crop), as ``rmeeto eval``."""
    from ..engine.data import build_eval_loader, check_eval_dir
    from ..engine.loop import evaluate

    spec = check_eval_dir(data, num_classes=gm.layout.num_classes)
    crop = s.crop_pct or gm.recipe.retrain.eval_crop_pct
    loader = build_eval_loader(spec, gm.layout.img_size, crop, batch_size=s.eval_batch_size, num_workers=s.eval_workers,
                               pin_memory=s.device == "cuda")
    m = evaluate(gm, loader, device=torch.device(s.device))
    return {"top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "images": m["images"],
            "classes": len(spec.classes), "split": str(spec.val), "crop_pct": crop, "dtype": "fp32"}


def _profile_one(t: ProfileTarget, s: ProfileSettings, data) -> dict:
    entry = _static_info(t)
    gm = set_backend(t.module.eval(), s.ops).to(device=s.device)
    set_merge_impl(gm, s.merge_impl)
    try:
        if data is not None:  # before the cast: accuracy is measured in fp32
            entry["accuracy"] = _accuracy(gm, data, s)
        gm.to(dtype=DTYPES[s.dtype])
        entry["timings"] = _time_all(gm, gm.layout, s, s.backends)
        if entry["merges"]:
            entry["merge_overhead"] = _overhead_rows(gm, entry["timings"], s)
    finally:
        gm.to("cpu")
        if s.device == "cuda":
            torch.cuda.empty_cache()
    return entry


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


def profile_models(targets: list[ProfileTarget], settings: ProfileSettings | None = None, *,
                   data: str | os.PathLike | None = None, progress=None) -> dict:
    """Profile ``targets`` (the first is the baseline) and return the report dict.

    The models are moved to ``settings.device`` / ``dtype`` in place and left on the CPU
    afterwards. ``progress(message)`` is called before each model (for a CLI spinner)."""
    if not targets:
        raise RmeetoError("nothing to profile: pass at least a baseline model")
    s = (settings or ProfileSettings()).resolved()
    torch.manual_seed(s.seed)
    entries = []
    for t in targets:
        if progress is not None:
            progress(f"profiling {t.name}")
        entries.append(_profile_one(t, s, data))
    _fill_speedups(entries)
    return {
        "rmeeto_profile": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware_info(s.device),
        "settings": asdict(s) | {"op_backend": ops.resolve_backend(s.ops, torch.empty(0, device=s.device)),
                                 "merge_impl_used": inference_merge_impl(s.merge_impl, s.device),
                                 "data": str(data) if data is not None else None},
        "methods": METHODS,
        "baseline": entries[0]["name"],
        "models": entries,
        "notes": _collect_notes(entries),
    }


def run_profile(ckpt: str | os.PathLike | None = None, *, out_dir: str | os.PathLike | None = None,
                baseline: str | os.PathLike | None = None, recipes: tuple[str, ...] | list[str] = (),
                model: str | None = None, family: str | None = None, data: str | os.PathLike | None = None,
                settings: ProfileSettings | None = None, progress=None, factory=None, **overrides) -> dict:
    """Load the models (:func:`load_targets`), profile them (:func:`profile_models`) and, with
    ``out_dir``, write ``report.json``, ``report.md`` and the PNG plots there. ``overrides`` are
    :class:`ProfileSettings` fields (``batch_sizes=(1, 8)``, ``device="cpu"``, ...)."""
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
    report = profile_models(targets, s, data=data, progress=progress)
    if len(targets) == 1:
        report["notes"].append("only the baseline was profiled: pass --recipes (or a compressed checkpoint) to compare")
    if out_dir is not None:
        from .report import write_report

        report["outputs"] = write_report(report, out_dir)
    return report
