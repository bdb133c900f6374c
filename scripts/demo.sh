#!/usr/bin/env bash
# Runs Ferry's main job locally: builds the Worker, starts the D1 emulator with a sample SQLite
# database and the Worker under `wrangler dev` (local R2 and Durable Objects), triggers a signed
# backup of every configured source, waits for it, and prints what landed in R2.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRY_ROOT"
bash scripts/setup.sh
bash scripts/build.sh
python3 scripts/demo.py
