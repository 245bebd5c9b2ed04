#!/usr/bin/env bash
# Downloads the diffusers baseline's Python wheels into .gpu/wheels (git-ignored) so they travel to
# a GPU machine without network access, whose PyTorch environment lacks diffusers. There:
#   pip install -q --no-deps --no-index --target /tmp/pylib .gpu/wheels/*.whl
#   PYTHONPATH=/tmp/pylib python3 scripts/bench_diffusers_flux.py
# numpy and hf_xet are left out (PyTorch's environment has numpy; hf_xet is only for downloads).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/.gpu/wheels"
mkdir -p "$OUT"
# The versions the PERF.md baselines were measured with; diffusers 0.42 wants huggingface_hub < 2.
pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$OUT" "diffusers==0.42.1" "huggingface_hub>=1.5,<2"
rm -f "$OUT"/numpy-*.whl "$OUT"/hf_xet-*.whl
du -sh "$OUT" >&2
