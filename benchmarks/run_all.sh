#!/usr/bin/env bash
# Every CPU benchmark, drjax vs PyTorch, with the same thread budget on both sides.
#
#   benchmarks/run_all.sh            # full: densenet121/resnet101/vgg16 x batch 16/64 (long)
#   benchmarks/run_all.sh --quick    # densenet121, batch 16, few repeats (minutes)
#   THREADS=1 benchmarks/run_all.sh  # pin both sides to one core
#   benchmarks/run_all.sh --cpu_conv            # drjax with the opt-in CPU convolutions
#   benchmarks/run_all.sh --keep_freed_memory   # both sides with glibc keeping freed memory
#
# Results: benchmarks/results/*.json; the README table lines are printed at the end of each.
# Run it on a quiet machine: other processes on the same cores distort every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ -n "${THREADS:-}" ]]; then args+=("--threads=${THREADS}"); fi

python benchmarks/bench_train.py "${args[@]}"
python benchmarks/bench_eval.py "${args[@]}"
# The Grad-CAM and input-pipeline benchmarks take their own flags (see their docstrings), so
# only --quick is passed on, and --keep_freed_memory and --cpu_conv to bench_gradcam.
quick=()
kept=()
for a in "${args[@]}"; do
  [[ "$a" == --quick ]] && quick=(--quick)
  [[ "$a" == --keep_freed_memory || "$a" == --cpu_conv ]] && kept+=("$a")
done
python benchmarks/bench_gradcam.py "${quick[@]}" "${kept[@]}" || echo "benchmarks/bench_gradcam.py failed" >&2
python benchmarks/bench_pipeline.py "${quick[@]}" || echo "benchmarks/bench_pipeline.py failed" >&2
