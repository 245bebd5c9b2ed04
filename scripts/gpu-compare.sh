#!/usr/bin/env bash
# The full-size FLUX.1-dev comparison with random weights on a GPU machine (from the repository
# root, binary in .gpu/): bf16 against every NVFP4 backend and mode. Resumable: the run lives in
# target/gpu-compare (kept on a warm machine between calls); each call archives it into OUT_DIR.
# Usage: scripts/gpu-compare.sh OUT_DIR [seconds to run before stopping, default 480]
set -uo pipefail
OUT=${1:?output folder}; LIMIT=${2:-480}
DIR=target/gpu-compare
VARIANTS=bf16
for b in trtllm cutlass cudnn; do for m in w4a16 w4a4 fp8; do VARIANTS="$VARIANTS,nvfp4:$b:$m"; done; done
ARGS=(--model flux.1-dev-random --width 512 --height 512 --steps 8 --max-prompts 2 --variants "$VARIANTS" --out "$DIR"
      --clip off)  # the GPU machines reach no hub: no CLIP model there
mkdir -p "$OUT"
nvidia-smi -L
RUST_LOG=candiff=info timeout "$LIMIT" .gpu/run.sh compare "${ARGS[@]}" 2>&1 | grep -v "^\s*$" | tail -40
echo "compare exit: ${PIPESTATUS[0]}"
.gpu/run.sh compare "${ARGS[@]}" --report-only 2>&1 | tail -1
# One archive: the machines return few files, at most two folders deep.
tar czf "$OUT/gpu-compare.tgz" -C "$(dirname "$DIR")" "$(basename "$DIR")"
