#!/usr/bin/env python3
"""Benchmark: how much does Ferry's copy cost compared with simply downloading the bytes?

Measured side by side in one run, against the same DXP emulator and the same backup:
  1. a plain HTTP download of the volume archive (read and discarded): the floor;
  2. the same download while hashing with SHA-256 in Python: what checksumming alone costs;
  3. a full Ferry backup of that backup under `wrangler dev` through the multipart path
     (`--part-mib` parts): download, SHA-256 in wasm, multipart upload to a staging key, re-read
     and re-hash of every part into the final key, manifest;
  4. the same backup with parts larger than the file, so it takes the single-put path (the whole
     file buffered once, one put verified by R2).
It prints each time and the ratios 3/1, 3/2 and 3/4 (what staging and read-back verification
cost). Times are wall-clock on this machine, best of
`--runs`. Local R2 and `wrangler dev` are not the production platform: read the ratios as the
shape of the cost, not as production throughput.

Usage: python3 bench/copy_throughput.py [--mib 32] [--runs 3] [--part-mib 5]
(The Worker must be built: bash scripts/build.sh. Sizes above ~40 MiB can exhaust descriptors
under local wrangler dev; see README.)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import DXP_SECRETS, DXP_USER_TOKEN, DxpEmulator, Ferry, dxp_source  # noqa: E402


def download(url: str, hash_it: bool) -> tuple[float, int]:
    req = urllib.request.Request(url, headers={"dxpcloud-authorization": f"Bearer {DXP_USER_TOKEN}"})
    h = hashlib.sha256()
    size = 0
    start = time.perf_counter()
    with urllib.request.urlopen(req) as resp:
        while chunk := resp.read(1 << 16):
            size += len(chunk)
            if hash_it:
                h.update(chunk)
    return time.perf_counter() - start, size


def ferry_backup(ferry: Ferry, source: str) -> float:
    start = time.perf_counter()
    status, _, payload = ferry.webhook(source, body=b"")
    assert status == 202, payload
    job = ferry.wait_job(payload["job"]["id"], timeout=600, interval=0.05)
    elapsed = time.perf_counter() - start
    assert job["phase"] == "committed", job
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description="Ferry copy cost vs a plain download, side by side")
    p.add_argument("--mib", type=float, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--part-mib", type=int, default=5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    emulator = DxpEmulator(work, volume_mib=args.mib, backups=1, database_kib=16)
    backup = emulator.backup(-1)
    volume_url = f"{emulator.url}/backup/download/volume/{backup['backupId']}"
    # One source per run: the same backup is never copied twice for a source.
    big_part = max(int(args.mib) + 1, args.part_mib)
    sources = [dxp_source(f"bench-{i}", emulator, part_size_mib=args.part_mib) for i in range(args.runs)]
    sources += [dxp_source(f"bench-single-{i}", emulator, part_size_mib=big_part) for i in range(args.runs)]
    ferry = Ferry(work / "ferry", sources, secrets=DXP_SECRETS)
    try:
        plain, hashed, full, single = [], [], [], []
        for i in range(args.runs):
            plain.append(download(volume_url, hash_it=False)[0])
            hashed.append(download(volume_url, hash_it=True)[0])
            full.append(ferry_backup(ferry, f"bench-{i}"))
            single.append(ferry_backup(ferry, f"bench-single-{i}"))
        total = backup["volume"]["size"] + backup["database"]["size"]
        best = lambda xs: min(xs)  # noqa: E731
        print(f"artifact: {backup['volume']['size'] / 2**20:.1f} MiB volume (+ {backup['database']['size'] / 1024:.0f} KiB database), "
              f"{args.part_mib} MiB parts, best of {args.runs}")
        print(f"  plain download            {best(plain):7.2f} s   {backup['volume']['size'] / 2**20 / best(plain):7.1f} MiB/s")
        print(f"  download + sha256 (py)    {best(hashed):7.2f} s   {backup['volume']['size'] / 2**20 / best(hashed):7.1f} MiB/s")
        print(f"  Ferry backup, multipart   {best(full):7.2f} s   {total / 2**20 / best(full):7.1f} MiB/s")
        print(f"  Ferry backup, single put  {best(single):7.2f} s   {total / 2**20 / best(single):7.1f} MiB/s")
        print(f"ratio Ferry / plain download: {best(full) / best(plain):.1f}x")
        print(f"ratio Ferry / download+sha256: {best(full) / best(hashed):.1f}x")
        print(f"ratio multipart (staged, re-read, verified) / single put: {best(full) / best(single):.2f}x")
        return 0
    finally:
        ferry.stop()
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
