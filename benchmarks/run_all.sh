#!/usr/bin/env bash
# Every CPU benchmark, drjax vs PyTorch, with the same thread budget on both sides.
#
#   benchmarks/run_all.sh            # full: densenet121/resnet101/vgg16 x batch 16/64 (long)
#   benchmarks/run_all.sh --quick    # densenet121, batch 16, few repeats (minutes)
#   THREADS=1 benchmarks/run_all.sh  # pin both sides to one core
#
# Results: benchmarks/results/*.json; the README table lines are printed at the end of each.
# Run it on a quiet machine: other processes on the same cores distort every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ -n "${THREADS:-}" ]]; then args+=("--threads=${THREADS}"); fi

python benchmarks/bench_train.py "${args[@]}"
python benchmarks/bench_eval.py "${args[@]}"
# The Grad-CAM (CAM) and input-pipeline (BUILDERS) benchmarks, where they exist; they take
# their own flags (see their docstrings), so only --quick is passed on.
quick=()
for a in "${args[@]}"; do [[ "$a" == --quick ]] && quick=(--quick); done
for extra in bench_gradcam bench_pipeline; do
  if [[ -f "benchmarks/${extra}.py" ]]; then
    python "benchmarks/${extra}.py" "${quick[@]}" || echo "benchmarks/${extra}.py failed" >&2
  fi
done
