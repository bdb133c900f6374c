#!/usr/bin/env bash
# Runs every test: native unit tests of the core, then the Worker built with worker-build and
# exercised under `wrangler dev` against the provider emulators, and a `wrangler deploy --dry-run`
# of the real wrangler.toml. Installs what it needs first (idempotent).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRY_ROOT"
bash scripts/setup.sh
echo "== native tests (cargo test)"
cargo test --locked
echo "== wasm build (worker-build --release)"
bash scripts/build.sh
echo "== emulator and end-to-end tests (pytest)"
python3 -m pytest -q -p no:cacheprovider --durations=30 tests "$@"
