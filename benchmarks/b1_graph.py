"""Batch-1 latency in a CUDA graph, each model in a process of its own.

On an H200 (torch 2.11+cu130) a process's first captured CUDA graph replays faster than any
graph once a second one has been captured: plain Vim-S 1.195 ms alone, 1.282 ms once another
graph exists (``--same-process``), the gaps between its kernels growing from 0.12 to ~0.5 µs
each (``triton_mixer_gpu.py --sections timeline``; docs/benchmarks.md, section 8). Timing several
models in one process therefore favours whichever is captured first. Here every (model, target)
is captured alone in a fresh process, as a server holding one batch-1 graph runs it, and the
rounds rotate the order of the processes.

Targets: ``plain``, ``r031`` (any recipe name), ``<recipe>-sliced`` (the merges replaced by
zero-cost slicing: the bound set by the token counts). Per target: the replay of one forward (``single``, CUDA events around one ``replay()`` as a caller sees it) and
back-to-back replays (``b2b``, 20 per timing: the GPU time per forward).

    python benchmarks/b1_graph.py --models vim_small,vim_tiny --targets plain,r031,r031-sliced \\
        --rounds 3 --out b1_graph.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _setup(tuning: str | None, merge_tuning: str | None):
    from compressor.merge import fast
    from compressor.ops import _triton_bimamba as tb

    if tuning:
        tb.TUNING.update(json.loads(tuning))
    if merge_tuning:
        fast.TUNING.update(json.loads(merge_tuning))


def _replayer(model: str, target: str, backend: str):
    """Capture ``target``'s batch-1 graph; returns ``(replay, note)``."""
    from compressor.convert import convert
    from compressor.inference import GraphedModel
    from compressor.models import create_model, set_backend
    from compressor.profile.overhead import sliced_variant

    torch.manual_seed(0)
    net = create_model(model).eval()
    if target != "plain":
        net = convert(net, target.removesuffix("-sliced"))
        if target.endswith("-sliced"):
            net = sliced_variant(net)
    net = set_backend(net, backend).to("cuda", torch.float16)
    x = torch.randn(1, 3, net.cfg.img_size, net.cfg.img_size, device="cuda", dtype=torch.float16)
    graphed = GraphedModel(net, clone_output=False)
    replay = graphed.replayer(x)
    return replay, graphed.note


def _time(replay, repeats: int) -> dict:
    from triton_mixer_gpu import timed  # CUDA events around each call, after warm-up

    def burst():
        for _ in range(20):
            replay()

    return {"single_ms": statistics.median(timed(replay, 10, repeats)),
            "b2b_ms": statistics.median(timed(burst, 0, max(3, repeats // 5))) / 20,
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def child(models: str, targets: str, backend: str, tuning, merge_tuning, repeats: int) -> list[dict]:
    """Every target of ``targets`` captured in this process, in order, each timed right after its
    capture; with more than one, all are timed again at the end (``again``)."""
    _setup(tuning, merge_tuning)
    out, held = [], []
    for model in models.split(","):
        for target in targets.split(","):
            replay, note = _replayer(model, target, backend)
            out.append(dict(model=model, target=target, graphs_held=len(held) + 1,
                            **({"note": note} if note else _time(replay, repeats))))
            held.append((model, target, replay, note))
    if len(held) > 1:
        for model, target, replay, note in held:
            if not note:
                out.append(dict(model=model, target=target, again=True, graphs_held=len(held), **_time(replay, repeats)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vim_small,vim_tiny")
    p.add_argument("--targets", default="plain,r031,r031-sliced")
    p.add_argument("--backend", default="triton")
    p.add_argument("--rounds", type=int, default=3, help="processes per (model, target), order rotated each round")
    p.add_argument("--repeats", type=int, default=50, help="timings of one replay per process")
    p.add_argument("--tuning", default=None, help="JSON overrides of the Triton scan's TUNING")
    p.add_argument("--merge-tuning", default=None, help="JSON overrides of the fast merge's TUNING")
    p.add_argument("--same-process", action="store_true",
                   help="capture every target in one process instead (prints each timed after its capture and again at the end)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("MODELS", "TARGETS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(*a.child, a.backend, a.tuning, a.merge_tuning, a.repeats)))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("b1_graph.py times CUDA graphs: it needs a CUDA GPU")
    if a.same_process:
        res = child(a.models, a.targets, a.backend, a.tuning, a.merge_tuning, a.repeats)
        for r in res:
            print(f"  {r['model']:9s} {r['target']:18s} graphs held {r['graphs_held']}{' (again)' if r.get('again') else '':8s} "
                  + (f"single {r['single_ms']:.3f} ms  b2b {r['b2b_ms']:.3f} ms" if "single_ms" in r else r["note"]))
        if a.out:
            Path(a.out).write_text(json.dumps({"args": vars(a), "same_process": res}, indent=1) + "\n")
        return 0
    targets = a.targets.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for model in a.models.split(","):
        for rnd in range(a.rounds):
            k = rnd % len(targets)
            for target in targets[k:] + targets[:k]:
                cmd = [sys.executable, __file__, "--child", model, target, "--backend", a.backend, "--repeats", str(a.repeats)]
                cmd += ["--tuning", a.tuning] if a.tuning else []
                cmd += ["--merge-tuning", a.merge_tuning] if a.merge_tuning else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{model} {target}: child failed: {proc.stderr.strip().splitlines()[-1:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])[0]
                runs.setdefault((model, target), []).append(res)
                print(f"  round {rnd} {model:9s} {target:18s} "
                      + (f"single {res['single_ms']:.3f} ms  b2b {res['b2b_ms']:.3f} ms" if "single_ms" in res else res["note"]),
                      flush=True)
    rows = []
    for (model, target), rs in runs.items():
        ok = [r for r in rs if "single_ms" in r]
        if not ok:
            rows.append(dict(model=model, target=target, note=rs[0].get("note", "")))
            continue
        rows.append(dict(model=model, target=target, single_ms=statistics.median(r["single_ms"] for r in ok),
                         b2b_ms=statistics.median(r["b2b_ms"] for r in ok), single_all=[r["single_ms"] for r in ok],
                         b2b_all=[r["b2b_ms"] for r in ok]))
    plain = {r["model"]: r for r in rows if r["target"] == "plain" and "single_ms" in r}
    print(f"\n{'model':9s} {'target':18s} {'single ms':>10s} {'b2b ms':>8s} {'vs plain (single)':>18s} {'vs plain (b2b)':>15s}")
    for r in rows:
        if "single_ms" not in r:
            print(f"{r['model']:9s} {r['target']:18s} {r['note']}")
            continue
        base = plain.get(r["model"])
        r["speedup_single"] = base["single_ms"] / r["single_ms"] if base else None
        r["speedup_b2b"] = base["b2b_ms"] / r["b2b_ms"] if base else None
        print(f"{r['model']:9s} {r['target']:18s} {r['single_ms']:10.3f} {r['b2b_ms']:8.3f} "
              f"{r['speedup_single'] or float('nan'):18.3f} {r['speedup_b2b'] or float('nan'):15.3f}")
    if a.out:
        info = next((r for rs in runs.values() for r in rs if "device" in r), {})
        Path(a.out).write_text(json.dumps({"device": info.get("device"), "torch": info.get("torch"), "args": vars(a),
                                           "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
