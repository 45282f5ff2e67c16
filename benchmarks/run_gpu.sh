#!/usr/bin/env bash
# The train and eval benchmarks on a GPU: drjax bfloat16 (float32 master weights) vs
# PyTorch AMP (autocast bfloat16), and both in float32, on the same card in the same run;
# then batch Grad-CAM (float32) against pytorch-grad-cam on the same card.
#
#   benchmarks/run_gpu.sh            # densenet121/resnet101/vgg16 x batch 16/64
#   benchmarks/run_gpu.sh --quick    # densenet121, batch 16
#
# Needs a CUDA build of jax (jax[cuda12] or jax[cuda13]) and of torch on the machine.
# Results: benchmarks/results/gpu/bench_{train,eval}_gpu*.json and bench_gradcam_*_gpu.json,
# with the card's name. The two processes of a comparison share the card, one timing at a
# time: jax is held to 45% of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION) so that PyTorch
# fits beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'PY'
import jax, torch
print('jax', jax.__version__, jax.devices())
print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())
assert any(d.platform == 'gpu' for d in jax.devices()), 'jax has no GPU backend here'
assert torch.cuda.is_available(), 'torch has no CUDA here'
PY
out=benchmarks/results/gpu
for precision in bf16 fp32; do
  python benchmarks/bench_train.py --device=gpu --precision="${precision}" --repeats=7 \
    --out_dir="${out}" "$@"
  python benchmarks/bench_eval.py --device=gpu --precision="${precision}" --repeats=7 \
    --out_dir="${out}" "$@"
done
if [[ " $* " == *" --quick "* ]]; then archs=densenet121; else archs='densenet121 resnet101'; fi
for arch in ${archs}; do
  python benchmarks/bench_gradcam.py --device=gpu --arch="${arch}" --batch=16 --repeats=7 \
    --out_dir="${out}"
done
