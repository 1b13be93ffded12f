#!/usr/bin/env bash
# CIFAR-10 reproduction of R-MeeTo's findings on real images (issue "proof on real images").
# Step 1 trains a base Vision Mamba from scratch with rmeeto's engine; every later step uses the
# CLI only, on that checkpoint in the official layout, as a user would with vim_s.pth.
#   DATA=/tmp/cifar10 RUN=runs/cifar10 EPOCHS=24 RT_EPOCHS=3 bash benchmarks/cifar10_repro.sh
# STEPS (default "base free rt") picks the steps, MODES (default "merge prune") and RATIOS the
# re-trainings, PROFILE_RATIOS the training-free profile, so that the run can be split over
# several GPU calls (base is skipped anyway when $RUN/vim_cifar10.pth exists); EVAL=0 skips the
# separate `rmeeto eval` after each re-training (its summary already holds top-1/top-5).
# On the lent GPU: `. benchmarks/gpu_env.sh` first (kernels + data); results land in $RUN and,
# as one archive $COPY/cifar10_results.tgz (reports, logs, summaries; no weights), written after
# every step so that a time-out keeps what finished (the device returns at most 8 files).
set -uo pipefail
DATA=${DATA:-/tmp/cifar10}; RUN=${RUN:-runs/cifar10}; COPY=${COPY:-$RUN}
EPOCHS=${EPOCHS:-24}; RT_EPOCHS=${RT_EPOCHS:-3}; RATIOS=${RATIOS:-"r031 r042"}
STEPS=${STEPS:-"base free rt"}; MODES=${MODES:-"merge prune"}
PROFILE_RATIOS=${PROFILE_RATIOS:-"r015 r031 r042"}; EVAL=${EVAL:-1}  # EVAL=0: the re-training summary only
export COLUMNS=${COLUMNS:-200}  # rich tables in the logs: full width, not cut at 80 columns
has() { [[ " $STEPS " == *" $1 "* ]]; }
R=benchmarks/cifar10; BASE=$RUN/vim_cifar10.pth
rm=(python3 -m compressor)
mkdir -p "$RUN" "$COPY"
pack() { tar czf "$COPY/cifar10_results.tgz" -C "$RUN" --exclude="*.pt" --exclude="*.pth" . 2>/dev/null; }
python3 -c "import torch; from compressor import ops; x = torch.empty(1, device='cuda');
b = ops.resolve_backend('auto', x); print('scan backend on cuda:', b, ops._kernels.ERRORS)
assert b == 'cuda', 'mamba-ssm kernels missing: source benchmarks/gpu_env.sh'" || exit 1
# 1. base model
if has base && [ ! -f "$BASE" ]; then
  python3 benchmarks/cifar10_train_base.py --data "$DATA" --out "$RUN" --epochs "$EPOCHS" 2>&1 | grep -v " step " | tee "$RUN/1_train_base.log"
  pack
fi
# 2. training-free merge and prune at three ratios: accuracy and GPU throughput, one profile run
if has free; then
free=$(for r in $PROFILE_RATIOS; do echo $R/merge-$r.toml $R/prune-$r.toml; done | tr ' ' '\n' | paste -sd,)
"${rm[@]}" profile "$BASE" --recipes "$free" --data "$DATA" --device cuda --dtype fp16 --batch-sizes 1,256 \
  --backends eager,graph --repeats 10 --workers 8 --crop-pct 1.0 -o "$RUN/free" 2>&1 | tee "$RUN/2_profile_free.log" | tail -40
pack
fi
# 3. merge + re-train and prune + re-train (distillation from the base model), then eval
if has rt; then for r in $RATIOS; do for mode in $MODES; do
  out=$RUN/rt-$mode-$r
  "${rm[@]}" compress "$BASE" --recipe $R/$mode-$r.toml --retrain-epochs "$RT_EPOCHS" --data "$DATA" -o "$out" \
    2>&1 | grep -v " step " | tee "$RUN/3_rt_$mode-$r.log" | tail -20
  [ "$EVAL" = 1 ] && "${rm[@]}" eval "$out/compressed.pt" --data "$DATA" --device cuda --workers 8 --crop-pct 1.0 2>&1 | tee "$RUN/4_eval_$mode-$r.log" | tail -12
  pack
done; done; fi
