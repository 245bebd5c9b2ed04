#!/usr/bin/env bash
# Renders a compare report in headless Chromium and saves a screenshot next to it (how
# docs/examples/*/report-screenshot.png are made). Needs chromium (Debian: apt-get install chromium).
# Usage: scripts/screenshot-report.sh OUT_DIR [WIDTHxHEIGHT]
set -euo pipefail
DIR=$(cd "${1:?usage: $0 OUT_DIR [WIDTHxHEIGHT]}" && pwd)
SIZE=${2:-1400x1000}
BIN=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$BIN" ] || { echo "no chromium found: install it (apt-get install chromium) to render the report" >&2; exit 1; }
"$BIN" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${SIZE/x/,}" \
  --screenshot="$DIR/report-screenshot.png" "file://$DIR/report.html"
