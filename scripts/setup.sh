#!/usr/bin/env bash
# Installs everything Ferry needs to build, run and test, idempotently: the wasm target,
# worker-build and the wasm-bindgen CLI at the versions the lockfile pins, the npm tooling
# (wrangler, esbuild, binaryen), pytest, for the dashboard's browser test Debian's chromium and
# Playwright for Python, and Debian's age for the encryption interop tests. What is already there
# at the right version is skipped.
#
#   bash scripts/setup.sh          everything: build, demo and tests (scripts/test.sh, CI)
#   bash scripts/setup.sh --demo   only what scripts/demo.sh needs: the wasm target, worker-build,
#                                  wasm-bindgen and the npm tooling. The demo's emulators and
#                                  harness are plain Python (standard library only), so pytest,
#                                  chromium, Playwright and age are skipped.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRY_ROOT"

demo_only=false
case "${1:-}" in
  "") ;;
  --demo) demo_only=true ;;
  *) echo "usage: bash scripts/setup.sh [--demo]" >&2; exit 2 ;;
esac

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
command -v node >/dev/null || { echo "node (>= 20.3) and npm are required"; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required for the emulators and tests"; exit 1; }

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

# The wasm-bindgen CLI must match the wasm-bindgen crate in Cargo.lock exactly.
bindgen_version=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$bindgen_version" ]; then
  say "installing wasm-bindgen-cli $bindgen_version (compiles once, a few minutes)"
  cargo install wasm-bindgen-cli --version "=$bindgen_version" --locked \
    || cargo install wasm-bindgen-cli --version "=$bindgen_version"
fi
if [ "$(worker-build --version 2>/dev/null | awk '{print $NF}')" != "$WORKER_BUILD_VERSION" ]; then
  say "installing worker-build $WORKER_BUILD_VERSION (compiles once, a few minutes)"
  cargo install worker-build --version "=$WORKER_BUILD_VERSION" --locked \
    || cargo install worker-build --version "=$WORKER_BUILD_VERSION"
fi

lock_sum=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -x node_modules/.bin/wrangler ] || [ "$(cat node_modules/.ferry-lock-sha256 2>/dev/null)" != "$lock_sum" ]; then
  say "installing npm tooling (wrangler on Node 22, esbuild, binaryen) from package-lock.json"
  # `npm install`, not `npm ci`: the registry these machines reach lacks workerd's macOS/Windows
  # optional packages, so `npm ci` refuses any lockfile made here. Versions are exact pins.
  # npm adds the other platforms' optional entries back to the lockfile; keep the committed one
  # so set-up leaves a fresh clone's tree clean.
  saved_lock=$(mktemp)
  cp package-lock.json "$saved_lock"
  npm install --no-audit --no-fund --loglevel=error || { cp "$saved_lock" package-lock.json; exit 1; }
  cp "$saved_lock" package-lock.json
  rm -f "$saved_lock"
  echo "$lock_sum" > node_modules/.ferry-lock-sha256
fi

if $demo_only; then
  say "toolchain ready for the demo (pytest, chromium, Playwright and age, for tests only, skipped)"
  exit 0
fi

if ! python3 -c 'import pytest' 2>/dev/null; then
  say "installing pytest"
  python3 -m pip install --quiet 'pytest>=8,<9'
fi
# The S3-compatible replica tests run moto's server (tests/s3_server.py), which checks SigV4
# signatures and IAM policies; its [server] extra brings flask and flask-cors.
moto_version=5.2.1
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null)" != "$moto_version" ] \
    || ! python3 -c 'import flask, flask_cors' 2>/dev/null; then
  say "installing moto[server] $moto_version (S3 server for the replica tests)"
  python3 -m pip install --quiet "moto[server]==$moto_version"
fi
# The dashboard's browser test drives Debian's Chromium with Playwright for Python: pip brings
# Playwright's driver only; its own browser download (`playwright install`) is never used.
if [ ! -x /usr/bin/chromium ]; then
  say "installing Debian's chromium (for tests/test_e2e_dashboard.py)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
# The encryption interop tests (src/encryption/tests.rs, run by `cargo test`) check Ferry's files
# against Debian's age and age-keygen.
if [ ! -x /usr/bin/age ] || [ ! -x /usr/bin/age-keygen ]; then
  say "installing Debian's age (for the encryption interop tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq age
fi
playwright_version=1.65.2
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null)" != "$playwright_version" ]; then
  say "installing playwright $playwright_version for Python"
  python3 -m pip install --quiet "playwright==$playwright_version"
fi
say "toolchain ready"
