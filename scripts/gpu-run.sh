#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: the carried binary with the machine's CUDA
# libraries. Usage: .gpu/run.sh <candiff arguments...>
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# NCCL (binaries built with `nccl`): the system's, else the one PyTorch's wheels bring.
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64 \
         /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib \
         /opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
BIN="$HERE/candiff"
if [ ! -x "$BIN" ] || [ "$HERE/candiff.xz" -nt "$BIN" ]; then
  xz -dc "$HERE/candiff.xz" > "$BIN.tmp" && chmod +x "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
fi
exec "$BIN" "$@"
