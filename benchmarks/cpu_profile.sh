#!/usr/bin/env bash
# The default CPU profile of a compressed 224 px model, timed end to end (start-up included):
#   bash benchmarks/cpu_profile.sh path/to/official_checkpoint.pth [WORKDIR]
# compresses the checkpoint with r031 (training-free), runs
#   rmeeto profile WORKDIR/model/compressed.pt --device cpu --batch-sizes 2 -o WORKDIR/report
# under /usr/bin/time -v and writes wall time, peak resident memory, the machine's load and the
# report's timings to benchmarks/results/cpu_profile.json.
set -euo pipefail
CKPT=${1:?usage: bash benchmarks/cpu_profile.sh CHECKPOINT [WORKDIR]}
WORK=${2:-/tmp/rmeeto-cpu-profile}
mkdir -p "$WORK"
python -m compressor compress "$CKPT" --recipe r031 -o "$WORK/model" > "$WORK/compress.log"
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
/usr/bin/time -v python -m compressor profile "$WORK/model/compressed.pt" --device cpu --batch-sizes 2 \
  -o "$WORK/report" > "$WORK/profile.log" 2> "$WORK/time.log"
cat "$WORK/profile.log"
python - "$WORK" "$CKPT" "$LOAD_BEFORE" <<'PY'
import json, os, re, sys
from pathlib import Path
work, ckpt, load = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
t = (work / "time.log").read_text()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
sec = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
rss_mb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
rep = json.loads((work / "report" / "report.json").read_text())
out = {
    "command": "rmeeto profile compressed.pt --device cpu --batch-sizes 2", "checkpoint": os.path.basename(ckpt),
    "wall_s": sec, "peak_rss_mb": rss_mb, "load_average_before": load, "cpus": os.cpu_count(),
    "cpu": rep["hardware"]["cpu"], "threads": rep["settings"]["threads"], "settings": rep["settings"],
    "timings": {m["name"]: [{k: r[k] for k in ("backend", "batch_size", "repeats", "latency_ms_median", "latency_ms_q1",
                                                "latency_ms_q3", "speedup", "speedup_within_noise")} for r in m["timings"]]
                for m in rep["models"]},
    "merge_overhead": {m["name"]: m["merge_overhead"] for m in rep["models"] if m["merge_overhead"]},
    "notes": rep["notes"],
}
dest = Path("benchmarks/results/cpu_profile.json")
dest.write_text(json.dumps(out, indent=2) + "\n")
print(f"wall {sec:.1f} s, peak RSS {rss_mb:.0f} MB, load {load} on {os.cpu_count()} CPUs -> {dest}")
PY
