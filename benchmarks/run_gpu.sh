#!/usr/bin/env bash
# The train and eval benchmarks on a GPU: drjax bfloat16 (float32 master weights) vs
# PyTorch AMP (autocast bfloat16), and both in float32, on the same card in the same run;
# then batch Grad-CAM (float32) against pytorch-grad-cam on the same card.
#
#   benchmarks/run_gpu.sh            # densenet121/resnet101/vgg16 x batch 16/64
#   benchmarks/run_gpu.sh --quick    # densenet121, batch 16
#
# Needs a CUDA build of jax (jax[cuda12] or jax[cuda13]) and of torch on the machine.
# One process per benchmark, precision and model, so that a run cut short keeps every finished
# JSON: benchmarks/results/gpu/
# bench_{train,eval}_gpu[_bf16]_MODEL.json and bench_gradcam_MODEL_gpu.json, with the card's
# name. The two processes of a comparison share the card, one timing at a time: jax is held
# to 45% of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION) so that PyTorch fits beside it.
set -euo pipefail
shopt -s nullglob  # a benchmark that wrote no JSON leaves nothing to move
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
tmp=$(mktemp -d)
trap 'rm -rf "${tmp}"' EXIT
if [[ " $* " == *" --quick "* ]]; then
  models=densenet121 cam_models=densenet121
else
  models='densenet121 resnet101 vgg16' cam_models='densenet121 resnet101'
fi
for precision in bf16 fp32; do
  for model in ${models}; do
    for bench in bench_train bench_eval; do
      python "benchmarks/${bench}.py" --device=gpu --precision="${precision}" --repeats=11 \
        --models="${model}" --out_dir="${tmp}" "$@"
      for f in "${tmp}"/*.json; do  # named by what it holds
        mv "${f}" "${out}/$(basename "${f%.json}")_${model}.json"
      done
    done
  done
done
for arch in ${cam_models}; do
  python benchmarks/bench_gradcam.py --device=gpu --arch="${arch}" --batch=16 --repeats=11 \
    --out_dir="${out}"
done
