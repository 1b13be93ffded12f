#!/usr/bin/env bash
# `rmeeto search` on the lent GPU (issue 18's must-show), in one device call:
#  A. Vim-S with random weights (speed only): search x1.35 at batch 128 (fp16, CUDA graphs), then
#     re-measure the found schedule beside r031 in a fresh `rmeeto profile` run.
#  B. The CIFAR-10 base model of docs/benchmarks.md section 4, trained here for $EPOCHS epochs
#     (about 20 s each on an H200), then a search for "as fast as CIFAR r031" (merge-r031.toml,
#     measured in the same run) at batch 256 scored on 1024 test images (top-1 agreement with the
#     unmerged model), a check on the 8,976 test images the search did not score
#     (benchmarks/search_heldout.py) and a fresh profile of the found schedule beside r031.
# On the device: `. benchmarks/gpu_env.sh` first (kernels + CIFAR-10 from .gpu2/), then
#   RES=$OUT bash benchmarks/search_gpu.sh
# STEPS (default "vims cifar") picks the parts; BASE=path skips the training; DEVICE, MODEL_A,
# BATCH_A, BATCH_B, BUDGET_A, BUDGET_B, NUM_IMAGES_B shrink it for a CPU smoke run. Results: one
# archive $RES/search_gpu.tgz (reports, logs, found recipes; no weights) rewritten after every
# step, and the two Pareto plots beside it.
set -uo pipefail
RES=${RES:-runs/search_gpu}; RUN=${RUN:-/tmp/search_gpu}; DATA=${DATA:-/tmp/cifar10}
STEPS=${STEPS:-"vims cifar"}; DEVICE=${DEVICE:-cuda}; EPOCHS=${EPOCHS:-6}
MODEL_A=${MODEL_A:-vim_small}; TARGET_A=${TARGET_A:-1.35}; BATCH_A=${BATCH_A:-128}; BUDGET_A=${BUDGET_A:-100s}
BATCH_B=${BATCH_B:-256}; BUDGET_B=${BUDGET_B:-80s}; NUM_IMAGES_B=${NUM_IMAGES_B:-1024}
export COLUMNS=${COLUMNS:-200}  # rich tables in the logs: full width
has() { [[ " $STEPS " == *" $1 "* ]]; }
rm=(python3 -m compressor)
C=benchmarks/cifar10
mkdir -p "$RES" "$RUN"
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }
pack() { tar czf "$RES/search_gpu.tgz" -C "$RUN" --exclude="*.pt" --exclude="*.pth" . 2>/dev/null; }

if has vims; then
  stamp "A. search $MODEL_A x$TARGET_A at batch $BATCH_A"
  "${rm[@]}" search --model "$MODEL_A" --target-speedup "$TARGET_A" --batch-size "$BATCH_A" --device "$DEVICE" \
    --num-images 256 --time-budget "$BUDGET_A" --compare r031,r042,r056 -o "$RUN/vims/found.toml" 2>&1 | tee "$RUN/A_search.log"
  stamp "A. fresh profile of the found schedule and r031"
  if [ -f "$RUN/vims/found.toml" ]; then
    "${rm[@]}" profile --model "$MODEL_A" --recipes "r031,$RUN/vims/found.toml" --device "$DEVICE" --batch-sizes "$BATCH_A" \
      --backends "$([ "$DEVICE" = cuda ] && echo graph || echo eager)" --overhead none -o "$RUN/vims/profile" 2>&1 | tee "$RUN/A_profile.log"
  fi
  cp "$RUN/vims/found_report/pareto.png" "$RES/A_pareto.png" 2>/dev/null
  pack
fi

if has cifar; then
  BASE=${BASE:-$RUN/cifar/vim_cifar10.pth}
  if [ ! -f "$BASE" ]; then
    stamp "B. train the CIFAR-10 base model, $EPOCHS epochs"
    python3 benchmarks/cifar10_train_base.py --data "$DATA" --out "$RUN/cifar" --epochs "$EPOCHS" --device "$DEVICE" 2>&1 \
      | grep -v " step " | tee "$RUN/B_train.log"
    pack
  fi
  stamp "B. search as fast as CIFAR r031 at batch $BATCH_B"
  "${rm[@]}" search "$BASE" --target-recipe $C/merge-r031.toml --batch-size "$BATCH_B" --device "$DEVICE" --data "$DATA" \
    --num-images "$NUM_IMAGES_B" --objective agreement --base-recipe $C/merge-r031.toml \
    --compare $C/merge-r015.toml,$C/merge-r031.toml,$C/merge-r042.toml --time-budget "$BUDGET_B" \
    -o "$RUN/cifar/found.toml" 2>&1 | tee "$RUN/B_search.log"
  cp "$RUN/cifar/found_report/pareto.png" "$RES/B_pareto.png" 2>/dev/null
  pack
  if [ -f "$RUN/cifar/found.toml" ]; then
    stamp "B. the test images the search did not score"
    python3 benchmarks/search_heldout.py "$BASE" --data "$DATA" --device "$DEVICE" --search-images "$NUM_IMAGES_B" \
      --recipes $C/merge-r015.toml,$C/merge-r031.toml,$C/merge-r042.toml,"$RUN/cifar/found.toml" \
      --out "$RUN/cifar/heldout.json" 2>&1 | tee "$RUN/B_heldout.log"
    stamp "B. fresh profile of the found schedule and r031"
    "${rm[@]}" profile "$BASE" --recipes "$C/merge-r031.toml,$RUN/cifar/found.toml" --device "$DEVICE" \
      --batch-sizes "$BATCH_B" --backends "$([ "$DEVICE" = cuda ] && echo graph || echo eager)" --overhead none \
      -o "$RUN/cifar/profile" 2>&1 | tee "$RUN/B_profile.log"
  fi
  pack
fi
stamp done
