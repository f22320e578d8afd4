#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/device/README.md): unpack the parts copied to /root/parts
# (onnxruntime-gpu, gguf, the SmolLM2 GGUF) and the onnxruntime-genai-cuda wheel once, then run
# tools/gpu_check.py with the given arguments; its log and JSON go to OUTDIR.
#   bash tools/gpu_device.sh OUTDIR [gpu_check.py arguments...]
set -euo pipefail
out=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
site=/root/site
if [[ ! -d $site/onnxruntime ]]; then
  mkdir -p "$site" && cat /root/parts/p* | xz -d -T16 | tar -xf - -C "$site"
fi
# The wheel travels in the tree's ignored whl/ (carried) or was copied to /root/whl by an earlier call.
wheel=$(ls "$here"/whl/onnxruntime_genai_cuda-*.whl /root/whl/onnxruntime_genai_cuda-*.whl 2>/dev/null | head -1 || true)
if [[ -n $wheel && ! -d $site/onnxruntime_genai ]]; then
  (cd "$site" && python3 -m zipfile -e "$wheel" .)
fi
export PYTHONPATH=$site
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())" | tee -a "$out/device.txt"
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$out/device.txt"
python3 "$here/tools/gpu_check.py" --src "$(ls $site/models/*.gguf | head -1)" --work /root/work --out "$out" "$@" \
  2>&1 | grep --line-buffered -v "it/s\]" | tee "$out/gpu_check.log"
