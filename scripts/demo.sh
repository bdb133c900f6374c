#!/usr/bin/env bash
# Runs Ferry's main job locally: builds the Worker, starts the four provider emulators (D1 with a
# sample SQLite database) and the Worker under `wrangler dev` (local R2 and Durable Objects),
# triggers a signed backup of every source, waits for it, and prints what landed in R2.
#
#   bash scripts/demo.sh           the backups, the listing, then everything stops
#   bash scripts/demo.sh --serve   the same, then the emulators and the Worker keep running: it
#                                  prints the dashboard's URL and API token; Ctrl-C stops it all
#
# Set-up installs only what the demo needs (`scripts/setup.sh --demo`: no pytest, no browser) and
# the time set-up and build took is printed.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRY_ROOT"

for arg in "$@"; do
  case "$arg" in
    --serve) ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash scripts/demo.sh [--serve]" >&2; exit 2 ;;
  esac
done

started=$SECONDS
bash scripts/setup.sh --demo
bash scripts/build.sh
echo "[demo] set-up and build took $((SECONDS - started)) s" \
  "(a first run compiles the wasm-bindgen CLI and worker-build; later runs skip what is there)"
# exec: Ctrl-C and SIGTERM reach demo.py itself, which stops the emulators and the Worker.
exec python3 scripts/demo.py "$@"
