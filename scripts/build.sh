#!/usr/bin/env bash
# Builds the Worker bundle (build/index.js + build/index_bg.wasm) with worker-build, using the
# local wasm-bindgen, esbuild and wasm-opt. Pass --dev for a faster unoptimised build.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRY_ROOT"
if [ "${1:-}" = "--dev" ]; then
  worker-build --release --no-opt
else
  worker-build --release
fi
