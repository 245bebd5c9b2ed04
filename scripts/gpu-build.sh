#!/usr/bin/env bash
# Builds the stripped CUDA release binary into .gpu/ (git-ignored) for a GPU machine, with the
# script that runs it there. Usage: scripts/gpu-build.sh [extra cargo features]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
FEATURES="cuda${1:+,$1}"
ENV_SH=$(bash scripts/setup-cuda.sh ${CANDIFF_SETUP_ARGS:-} | tail -1)
# shellcheck disable=SC1090
source "$ENV_SH"
cargo build --release --features "$FEATURES" --bin candiff
mkdir -p .gpu
cp target/release/candiff .gpu/candiff
cp scripts/gpu-run.sh .gpu/run.sh
ls -la .gpu/candiff >&2
