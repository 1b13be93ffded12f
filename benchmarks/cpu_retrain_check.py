"""CPU re-training check: ``rmeeto compress CKPT --recipe r031 --retrain-epochs 1 --data DIR``
on a small CIFAR-10 subset, timed and measured with ``/usr/bin/time -v`` (wall time, peak
resident memory), with the machine's load beside it.

The subset is made here from the two CIFAR-10 archives (``train.tar.xz`` and ``test.tar.xz``,
ImageFolder JPEG layout ``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``): images
``0000 .. N-1`` of every class go to ``DIR/train/<class>`` and ``DIR/val/<class>``.

    python benchmarks/cpu_retrain_check.py CKPT CIFAR10_DIR --per-class 26 \\
        --out benchmarks/results/cpu_retrain_check.json

``CKPT``: an official-layout Vim checkpoint with a 10-class head (the issue's case: depth 8,
dim 192, 224 px). Extra arguments after ``--`` go to ``rmeeto compress`` (e.g. ``-- --batch-size 32``).
Then ``rmeeto eval OUT/compressed.pt --data DIR`` is timed the same way, with this checkout and,
with ``--eval-repo OLD``, with another checkout's ``compressor`` (before/after on one file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor._io import atomic_write_text  # noqa: E402

SPLITS = (("train.tar.xz", "train", "train"), ("test.tar.xz", "test", "val"))


def make_subset(cifar_dir: Path, dest: Path, per_class: int) -> dict:
    """Extract images ``0 .. per_class-1`` of every class of both archives (one streaming pass
    each). Returns ``{split: images}``."""
    counts = {}
    for archive, inner, split in SPLITS:
        n = 0
        with tarfile.open(cifar_dir / archive, mode="r|xz") as tar:
            for member in tar:
                m = re.fullmatch(rf"{inner}/([^/]+)/(\d+)\.(jpg|png)", member.name)
                if not member.isfile() or m is None or int(m.group(2)) >= per_class:
                    continue
                target = dest / split / m.group(1) / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                n += 1
        counts[split] = n
    return counts


def _time_v(stderr: str) -> dict:
    """Wall and CPU (user + system, children included) seconds and peak RSS (GB) from
    ``/usr/bin/time -v``'s report."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stderr))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = None
    if wall:
        parts = [float(p) for p in wall.group(1).split(":")]
        seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {"wall_s": seconds, "cpu_s": cpu, "peak_rss_gb": int(rss.group(1)) / 1e6 if rss else None}


def _timed(argv: list[str], repo: Path) -> dict:
    """``rmeeto ARGV`` run with ``repo``'s compressor under ``/usr/bin/time -v``: return code,
    wall, CPU and peak memory, the load average around it, the last output lines."""
    cmd = [sys.executable, "-m", "compressor", *argv]
    load_before = os.getloadavg()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    row = {"command": "rmeeto " + " ".join(argv), "returncode": proc.returncode, **_time_v(proc.stderr),
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "output_tail": proc.stdout[-1500:]}
    print(f"{row['command'][:60]}...: rc {proc.returncode}, wall {row['wall_s']:.0f} s, cpu {row['cpu_s']:.0f} s, "
          f"peak RSS {row['peak_rss_gb']:.2f} GB, load {load_before[0]:.1f} -> {row['load_avg_after'][0]:.1f}", flush=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
    return row


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except Exception:  # no lscpu: the platform string is the best we have
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("cifar", type=Path, help="folder holding CIFAR-10's train.tar.xz and test.tar.xz")
    p.add_argument("--per-class", type=int, default=26)
    p.add_argument("--recipe", default="r031")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="where the subset and the output go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_retrain_check.json")
    p.add_argument("--eval-repo", type=Path, default=None, help="also time rmeeto eval with this checkout's code")
    p.add_argument("--eval-only", action="store_true", help="only time rmeeto eval on the run already in --work")
    p.add_argument("extra", nargs="*", help="after --: more rmeeto compress options")
    args = p.parse_args(argv)

    work = (args.work or Path(tempfile.mkdtemp(prefix="rmeeto-cpu-retrain-"))).resolve()
    args.ckpt = args.ckpt.resolve()  # the commands run from the measured checkout's root
    data, out_dir = work / "data", work / "out"
    result = {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0))}
    if not args.eval_only:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        result["images"] = make_subset(args.cifar, data, args.per_class)
        print(f"subset: {result['images']} images in {data}", flush=True)
        cmd = ["compress", str(args.ckpt), "--recipe", args.recipe, "--retrain-epochs", str(args.epochs),
               "--data", str(data), "-o", str(out_dir), *args.extra]
        result["compress"] = _timed(cmd, ROOT)
        if (out_dir / "summary.md").exists():
            result["summary_md"] = (out_dir / "summary.md").read_text()
    if (out_dir / "compressed.pt").exists():
        evaluate = ["eval", str(out_dir / "compressed.pt"), "--data", str(data)]
        result["eval"] = _timed(evaluate, ROOT)
        if args.eval_repo is not None:
            result["eval_other_repo"] = {"repo": str(args.eval_repo.resolve()), **_timed(evaluate, args.eval_repo.resolve())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return max([0] + [result[k]["returncode"] for k in ("compress", "eval", "eval_other_repo") if k in result])


if __name__ == "__main__":
    sys.exit(main())
