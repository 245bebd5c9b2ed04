#!/usr/bin/env bash
# Builds the stripped CUDA release binary into .gpu/ (git-ignored) for a GPU machine, with the
# script that runs it there. Usage: scripts/gpu-build.sh [extra cargo features]
# CANDIFF_GPU_DIR puts it elsewhere (a second build to carry beside the first, e.g. a profiling
# build with `sm90-phases` into .gpu/phases; keep the folder git-ignored).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
FEATURES="cuda${1:+,$1}"
DEST=${CANDIFF_GPU_DIR:-.gpu}
ENV_SH=$(bash scripts/setup-cuda.sh ${CANDIFF_SETUP_ARGS:-} | tail -1)
# shellcheck disable=SC1090
source "$ENV_SH"
cargo build --release --features "$FEATURES" --bin candiff
mkdir -p "$DEST"
# Compressed: the tree that travels to a GPU machine is size-limited (the fatbins compress ~7x);
# run.sh unpacks it there.
rm -f "$DEST/candiff"
xz -T2 -6 -c target/release/candiff > "$DEST/candiff.xz"
cp scripts/gpu-run.sh "$DEST/run.sh"
ls -la "$DEST/candiff.xz" >&2
