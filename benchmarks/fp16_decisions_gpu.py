"""fp16/bf16 merge decisions against fp32: which backend, merge implementation and precision mode
keeps the merges (and the top-1 class) of the fp32 model, and why not.

Two parts, one run:

1. The depth-24 conformance-style case: a Vim of depth 24, width 64, 224 px (197 tokens, class
   token in the middle), weights built the way the official conformance fixtures are (seeded
   init, + 0.02·N(0, 1) noise, rounded to the fp16 grid), seeded random images; five recipes
   (merge num_prune 5/11/15, prune 11/15). Reference: the ``ref`` backend with the torch merge in
   fp32 (TF32 off), which equals the official code's logits within 1e-4 on the depth-8 fixtures.
   For backends cuda/chunked/ref × merge torch/triton × precision fp16/bf16 (weights cast, as
   ``rmeeto profile`` does) and amp-fp16/amp-bf16 (fp32 weights under autocast, as the official
   eval): logits relative error (max |Δ| / max |ref|), top-1 agreement, merges whose decisions
   (slot maps: the kernel's own for the triton merge) equal the fp32 run's. Diagnostics: the same runs with the merge decisions pinned to the fp32
   ones (the numerical drift alone), and the fp32 decision margins (gap at the top-r cut, gap to
   the second-best destination) that the drift has to cross to change a decision; and the torch
   merge with fp16-rounded scores (what the official code's fp16 matmul under autocast computes).
2. A trained model: a CIFAR-10 Vim (D 192, depth 12, 65 tokens) trained here for a fixed time on
   8000 images of the CIFAR-10 test archive (the train archive does not fit the GPU machine's
   transfer limit beside the kernels) and evaluated on the 2000 held-out ones: top-1 agreement
   of every (backend, merge, precision) with the fp32 reference, plain and with merge/prune r8.

    . benchmarks/gpu_env.sh   # the CUDA kernels
    python3 benchmarks/fp16_decisions_gpu.py --out runs/fp16 [--cifar test.tar.xz] [--parts conformance,cifar]
    python benchmarks/fp16_decisions_gpu.py --table runs/fp16/fp16_decisions.json   # docs/benchmarks.md's table

Prints tables and writes ``fp16_decisions.json`` under ``--out`` after each part. Part 2 is
skipped when less than ``--train-s`` + 40 s of ``--budget-s`` is left (about 130 s for part 1 on
an H200, 2 minutes for part 2). ``--device cpu --quick`` runs a tiny version on the CPU
(ref/chunked backends, the torch merge) to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import convert  # noqa: E402
from compressor.merge import MergeConfig, TokenMerge, fast, set_merge_impl, slot_map  # noqa: E402
from compressor.merge import bipartite  # noqa: E402
from compressor.models import VimConfig, VisionMamba, set_backend  # noqa: E402
from compressor.ops import kernels_available  # noqa: E402

CASES = {"merge5": ("merge", 5), "merge11": ("merge", 11), "merge15": ("merge", 15),
         "prune11": ("prune", 11), "prune15": ("prune", 15)}
MODES = ("fp16", "bf16", "amp-fp16", "amp-bf16")
T0 = time.perf_counter()


def _elapsed() -> float:
    return time.perf_counter() - T0


def conformance_model(depth=24, dim=64, img=224, classes=10) -> VisionMamba:
    """Built as the official fixtures: seed 0 init, + 0.02·randn (seed 1) in parameter order,
    rounded to the fp16 grid (kept in fp32)."""
    torch.manual_seed(0)
    model = VisionMamba(VimConfig(embed_dim=dim, depth=depth, img_size=img, num_classes=classes)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())
    return model


def _merges(gm) -> list[TokenMerge]:
    return [m for m in gm.modules() if isinstance(m, TokenMerge)]


@contextlib.contextmanager
def _hooks(gm, slots: dict | None = None, inputs: dict | None = None, margins: list | None = None,
           pinned: dict | None = None):
    """Record each merge's decisions (slot maps), its inputs, the fp32 decision margins; or pin
    the decisions to given slot maps."""
    handles, saved = [], []
    for i, m in enumerate(_merges(gm)):
        if slots is not None:
            handles.append(m.register_forward_pre_hook(lambda mod, a, i=i: slots.__setitem__(i, _decisions(mod, *a))))
        if inputs is not None:
            handles.append(m.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, (a[0].float(), a[1].float()))))
        if margins is not None:
            handles.append(m.register_forward_pre_hook(lambda mod, a, i=i: margins.append(_margin(mod, a[0]))))
        if pinned is not None:
            saved.append((m, m.forward))
            m.forward = _pinned_forward(m, pinned, i)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, f in saved:
            m.forward = f


def _decisions(m: TokenMerge, hidden, residual, size=None) -> torch.Tensor:
    """The slot map this merge computes on its input: the kernel's own for the triton merge."""
    if m.impl == "triton":
        return fast._launch(hidden, residual, size, m.r, m.cls_in, m.cls_out, m.prune)[3].long()
    return slot_map(hidden, m.r, m.cls_in, m.cls_out, ordered=m.ordered, prune=m.prune, distance=m.distance)


def _pinned_forward(m: TokenMerge, pinned: dict, i: int):
    """Merge with a given slot map: record it when ``pinned[i]`` is unset, reuse it after."""
    def forward(hidden, residual, size=None):
        if i not in pinned:
            pinned[i] = slot_map(hidden, m.r, m.cls_in, m.cls_out, ordered=m.ordered, prune=m.prune,
                                 distance=m.distance)
        return bipartite.apply_slots(pinned[i], hidden, residual, size, hidden.shape[1] - m.r, m.prune)
    return forward


def _margin(m: TokenMerge, hidden: torch.Tensor) -> dict:
    """How far the fp32 decisions are from changing: per image, the gap between the r-th and
    (r+1)-th best source score, and the smallest gap between a merged source's best and
    second-best destination."""
    metric = bipartite._drop_cls(hidden, m.cls_in)
    s = bipartite._scores(metric, m.distance)
    top2 = s.topk(2, dim=-1).values
    best = top2[..., 0]
    order = best.sort(dim=-1, descending=True).values
    cut = (order[:, m.r - 1] - order[:, m.r]) if m.r < order.shape[1] else torch.full_like(order[:, 0], float("inf"))
    chosen = best.sort(dim=-1, descending=True).indices[:, : m.r]
    dst_gap = (top2[..., 0] - top2[..., 1]).gather(1, chosen).min(dim=1).values
    return {"cut": cut.cpu(), "dst": dst_gap.cpu()}


def official_fp16_scores(metric: torch.Tensor, distance: str) -> torch.Tensor:
    """The official merge under fp16 autocast: ``metric / metric.norm()`` (fp32: norm autocasts to
    fp32), then the matmul in fp16 with an fp16 result."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    return (m[:, 0::2].half() @ m[:, 1::2].half().transpose(1, 2)).float()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _run(gm, x, backend, impl, mode, device, **hook_kw):
    """Logits of ``gm`` (fp32 weights) under ``backend``/``impl``/``mode``: fp16/bf16 run a cast
    copy (casting back would keep the rounding), amp runs fp32 weights under autocast."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
    amp = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}.get(mode)
    model = copy.deepcopy(gm).to(dtype) if dtype is not None else gm
    set_backend(model, backend)
    set_merge_impl(model, impl)
    ctx = torch.autocast(device, dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx, _hooks(model, **hook_kw):
        return model(x.to(dtype) if dtype is not None else x).float()


def combos(device: str, quick: bool):
    backends = ["ref", "chunked"] + (["cuda"] if device == "cuda" and all(kernels_available().values()) else [])
    impls = ["torch"] + (["triton"] if device == "cuda" and fast.available() else [])
    modes = ["fp16"] if quick else list(MODES)
    return backends, impls, modes


def conformance(device: str, quick: bool, images: int) -> dict:
    model = conformance_model(depth=6, dim=32, img=64) if quick else conformance_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(images, 3, model.cfg.img_size, model.cfg.img_size, generator=g).to(device)
    backends, impls, modes = combos(device, quick)
    out = {"model": model.cfg.to_dict(), "images": images, "backends": backends, "impls": impls, "cases": {}}
    for name, (mode_, r) in CASES.items():
        gm = convert(model, MergeConfig(mode=mode_, num_prune=r)).to(device)
        ref_slots, ref_inputs, margins, pinned = {}, {}, [], {}
        ref = _run(gm, x, "ref", "torch", "fp32", device, slots=ref_slots, margins=margins)
        _run(gm, x, "ref", "torch", "fp32", device, pinned=pinned, inputs=ref_inputs)  # records the fp32 slot maps
        case = {"margin_cut_min": min(m["cut"].min().item() for m in margins),
                "margin_dst_min": min(m["dst"].min().item() for m in margins),
                "margin_cut_median": torch.cat([m["cut"] for m in margins]).median().item(), "runs": []}
        for backend in backends:
            for mode in ["fp32"] + modes:
                ins = {}
                drift = _run(gm, x, backend, "torch", mode, device, pinned=pinned, inputs=ins)
                for impl in impls:
                    got_slots = {}
                    got = _run(gm, x, backend, impl, mode, device, slots=got_slots)
                    case["runs"].append(_row(backend, impl, mode, got, ref, got_slots, ref_slots, drift, ins, ref_inputs))
        for mode in ("fp16", "amp-fp16"):
            if mode not in modes:
                continue
            orig = bipartite._scores
            bipartite._scores = official_fp16_scores
            try:
                got_slots = {}
                got = _run(gm, x, backends[-1], "torch", mode, device, slots=got_slots)
            finally:
                bipartite._scores = orig
            case["runs"].append(_row(backends[-1], "torch, fp16 scores", mode, got, ref, got_slots, ref_slots))
        out["cases"][name] = case
        print(f"[{_elapsed():5.0f}s] conformance {name} done", flush=True)
    return out


def _row(backend, impl, mode, got, ref, slots, ref_slots, drift=None, ins=None, ref_ins=None) -> dict:
    same = [torch.equal(slots[i], ref_slots[i]) for i in sorted(ref_slots)]
    row = {"backend": backend, "impl": impl, "mode": mode, "rel_err": _rel(got, ref),
           "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
           "merges_equal": f"{sum(same)}/{len(same)}", "first_diverging_merge": same.index(False) if not all(same) else None,
           "pinned_rel_err": None if drift is None else _rel(drift, ref)}
    if ins:  # drift of the merge inputs with the fp32 decisions: first and last merge
        for k, i in (("first", 0), ("last", len(ref_ins) - 1)):
            row[f"hidden_err_{k}_merge"] = _rel(ins[i][0], ref_ins[i][0])
            row[f"residual_err_{k}_merge"] = _rel(ins[i][1], ref_ins[i][1])
    return row


def print_conformance(res: dict) -> None:
    for name, case in res["cases"].items():
        print(f"\n{name}: fp32 decision margins: top-r cut min {case['margin_cut_min']:.2e} "
              f"(median {case['margin_cut_median']:.2e}), best-vs-second destination min {case['margin_dst_min']:.2e}")
        print(f"{'backend':8} {'merge':20} {'mode':9} {'rel err':>9} {'top-1':>6} {'merges':>7} {'pinned err':>10} "
              f"{'hid err 1st':>11} {'res err 1st':>11}")
        for r in case["runs"]:
            pin = "-" if r["pinned_rel_err"] is None else f"{r['pinned_rel_err']:.2e}"
            hid = f"{r['hidden_err_first_merge']:.2e}" if "hidden_err_first_merge" in r else "-"
            res = f"{r['residual_err_first_merge']:.2e}" if "residual_err_first_merge" in r else "-"
            print(f"{r['backend']:8} {r['impl']:20} {r['mode']:9} {r['rel_err']:9.2e} {r['top1_agree']:6.2f} "
                  f"{r['merges_equal']:>7} {pin:>10} {hid:>11} {res:>11}")


def _same(a: dict, b: dict) -> bool:
    """Two merge implementations that took the same decisions and top-1 (one table row)."""
    return a["eq"] == b["eq"] and a["top1"] == b["top1"]


def markdown(res: dict) -> str:
    """docs/benchmarks.md's summary of part 1: per (backend, merge, mode), over the five recipes."""
    cases = res["cases"]
    lines = ["| recipe | top-r cut margin, min (median) | best vs 2nd destination, min |", "| --- | --- | --- |"]
    lines += [f"| {n} | {c['margin_cut_min']:.1e} ({c['margin_cut_median']:.1e}) | {c['margin_dst_min']:.1e} |"
              for n, c in cases.items()]
    agg: dict = {}
    for c in cases.values():
        for r in c["runs"]:
            a = agg.setdefault((r["backend"], r["impl"], r["mode"]), {"eq": 0, "n": 0, "top1": [], "err": 0.0, "pin": 0.0, "hid": 0.0})
            eq, n = map(int, r["merges_equal"].split("/"))
            a["eq"] += eq
            a["n"] += n
            a["top1"].append(r["top1_agree"])
            a["err"] = max(a["err"], r["rel_err"])
            a["pin"] = max(a["pin"], r["pinned_rel_err"] or 0.0)
            a["hid"] = max(a["hid"], r.get("hidden_err_first_merge", 0.0))
    lines += ["", "| backend | merge | precision | merges decided as in fp32 | top-1 agreement | logits rel. err (max) "
              "| same, fp32 decisions pinned | hidden err. at merge 1 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (backend, impl, mode), a in agg.items():
        twin = agg.get((backend, "triton", mode)) if impl == "torch" else None
        if impl == "triton" and (backend, "torch", mode) in agg and _same(agg[(backend, "torch", mode)], a):
            continue  # printed with its torch twin
        if twin is not None and _same(a, twin):
            impl, a = "torch, triton", {**a, "err": max(a["err"], twin["err"])}
        pin = f"{a['pin']:.1e}" if a["pin"] else "-"
        hid = f"{a['hid']:.1e}" if a["hid"] else "-"
        lines.append(f"| {backend} | {impl} | {mode} | {a['eq']}/{a['n']} | {100 * sum(a['top1']) / len(a['top1']):.1f}% "
                     f"| {a['err']:.1e} | {pin} | {hid} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CIFAR-10


def load_cifar(tar_path: str, device: str):
    """All JPEGs of an ImageFolder tar.xz as uint8 ``(N, 3, 32, 32)`` and labels (sorted classes)."""
    import io

    import numpy as np
    from PIL import Image

    files = {}
    with tarfile.open(tar_path, "r|xz") as tf:  # a stream: read in archive order (seeking in xz is quadratic)
        for m in tf:
            if m.name.endswith(".jpg"):
                files[m.name] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
    names = sorted(files)
    classes = {c: i for i, c in enumerate(sorted({n.split("/")[-2] for n in names}))}
    x = torch.from_numpy(np.stack([files[n] for n in names])).permute(0, 3, 1, 2).contiguous().to(device)
    return x, torch.tensor([classes[n.split("/")[-2]] for n in names], device=device)


MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _norm(x_u8: torch.Tensor) -> torch.Tensor:
    return (x_u8.float() / 255 - MEAN.to(x_u8.device)) / STD.to(x_u8.device)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, on the GPU."""
    b = x.shape[0]
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,), generator=g).tolist()
    x = pad[..., i : i + 32, j : j + 32]
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)


def train_cifar(x, y, device, seconds: float, width=192, depth=12, batch=256) -> tuple[VisionMamba, dict]:
    """AdamW, cosine over the steps the time allows, bf16 autocast on the GPU (fp32 and the
    ``chunked`` scan on the CPU, whose backward is the faster there)."""
    torch.manual_seed(0)
    cfg = VimConfig(embed_dim=width, depth=depth, img_size=32, patch_size=4, stride=4, num_classes=10, drop_path_rate=0.1)
    model = set_backend(VisionMamba(cfg), "auto" if device == "cuda" else "chunked").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    xn = _norm(x)
    steps, t0, epoch = 0, time.perf_counter(), 0
    est_steps = None
    while time.perf_counter() - t0 < seconds:
        perm = torch.randperm(len(x), generator=g).to(device)
        for k in range(0, len(x) - batch + 1, batch):
            idx = perm[k : k + batch]
            if est_steps:
                lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(steps / est_steps, 1.0)))
                for grp in opt.param_groups:
                    grp["lr"] = lr
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(_augment(xn[idx], g)), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        epoch += 1
        if epoch == 1:  # cosine schedule over the steps the time allows
            torch.cuda.synchronize() if device == "cuda" else None
            est_steps = int(steps * seconds / (time.perf_counter() - t0))
    info = {"width": width, "depth": depth, "batch": batch, "steps": steps, "epochs": epoch,
            "train_s": time.perf_counter() - t0, "loss": loss.item()}
    return model.eval(), info


def cifar_agreement(model, x, y, device, quick=False) -> dict:
    backends, impls, modes = combos(device, quick)
    xn = _norm(x)
    out = {}
    for name, merge in {"plain": None, "merge8": MergeConfig(num_prune=8), "prune8": MergeConfig(mode="prune", num_prune=8)}.items():
        gm = convert(model, merge if merge is not None else MergeConfig(num_prune=0))
        ref = torch.cat([_run(gm, xb, "ref", "torch", "fp32", device) for xb in xn.split(1000)])
        rows = []
        for backend in backends:
            for mode in ["fp32"] + modes:
                for impl in impls if name != "plain" else ["torch"]:
                    got = torch.cat([_run(gm, xb, backend, impl, mode, device) for xb in xn.split(1000)])
                    rows.append({"backend": backend, "impl": impl, "mode": mode, "rel_err": _rel(got, ref),
                                 "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                                 "acc": (got.argmax(-1) == y).float().mean().item()})
        out[name] = {"ref_acc": (ref.argmax(-1) == y).float().mean().item(), "runs": rows}
        print(f"[{_elapsed():5.0f}s] cifar {name} done", flush=True)
    return out


def print_cifar(res: dict) -> None:
    for name, r in res["models"].items():
        print(f"\nCIFAR-10 {name}: fp32 reference top-1 {100 * r['ref_acc']:.2f}% on {res['held_out']} held-out images")
        print(f"{'backend':8} {'merge':7} {'mode':9} {'rel err':>9} {'agree':>7} {'top-1':>7}")
        for row in r["runs"]:
            print(f"{row['backend']:8} {row['impl']:7} {row['mode']:9} {row['rel_err']:9.2e} "
                  f"{100 * row['top1_agree']:6.2f}% {100 * row['acc']:6.2f}%")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fp16_decisions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cifar", default=None, help="CIFAR-10 test.tar.xz (ImageFolder inside); part 2 is skipped without it")
    p.add_argument("--train-s", type=float, default=45.0, help="wall-clock seconds of CIFAR training")
    p.add_argument("--cifar-width", type=int, default=192)
    p.add_argument("--cifar-depth", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256, help="CIFAR training batch")
    p.add_argument("--budget-s", type=float, default=260.0, help="skip part 2 if less than what it needs is left")
    p.add_argument("--parts", default="conformance,cifar", help="which parts to run (comma-separated)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a tiny part 1 (CPU check of the script)")
    p.add_argument("--table", default=None, help="print the Markdown summary of a result JSON and exit")
    a = p.parse_args(argv)
    if a.table:
        print(markdown(json.loads(Path(a.table).read_text())["conformance"]))
        return
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hw = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__,
          "kernels": kernels_available()}
    result = {"hardware": hw, "command": " ".join(sys.argv)}

    def save():
        (out_dir / "fp16_decisions.json").write_text(json.dumps(result, indent=1, default=str))

    parts = a.parts.split(",")
    if "conformance" in parts:
        result["conformance"] = conformance(a.device, a.quick, a.images)
        save()
        print_conformance(result["conformance"])
    if "cifar" not in parts:
        pass
    elif a.cifar and _elapsed() + a.train_s + 40 < a.budget_s:
        x, y = load_cifar(a.cifar, a.device)
        if a.quick:
            x, y = x[::20], y[::20]
        held = torch.arange(len(x), device=a.device) % 5 == 0
        print(f"[{_elapsed():5.0f}s] cifar: {int((~held).sum())} training, {int(held.sum())} held-out images", flush=True)
        model, info = train_cifar(x[~held], y[~held], a.device, a.train_s, *((32, 4) if a.quick else (a.cifar_width, a.cifar_depth)),
                                  batch=a.batch_size)
        print(f"[{_elapsed():5.0f}s] cifar: trained {info['epochs']} epochs ({info['steps']} steps)", flush=True)
        result["cifar"] = {"training": info, "held_out": int(held.sum()), "models": {}}
        result["cifar"]["models"] = cifar_agreement(model, x[held], y[held], a.device, a.quick)
        save()
        print_cifar(result["cifar"])
    elif a.cifar:
        print(f"CIFAR part skipped: {_elapsed():.0f}s used of a {a.budget_s:.0f}s budget")
    print(f"[{_elapsed():5.0f}s] wrote {out_dir / 'fp16_decisions.json'}")


if __name__ == "__main__":
    main()
