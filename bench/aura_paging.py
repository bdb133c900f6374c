#!/usr/bin/env python3
"""Benchmark: the Aura logical export's time against the graph's size (not run in CI).

Ferry pages the graph by internal id ranges (``id(n) IN range($from, $to)``, an id seek), so a page
reads the ids it asks for and the export's time should grow linearly with the graph. Paging by
``elementId(n) > $after ORDER BY id LIMIT`` read (and sorted) the whole graph for every page:
quadratic. For each size this starts the Aura emulator (tests/emulators/aura.py) with a seeded
graph of N nodes and 2N relationships and the built Worker under ``wrangler dev`` (one snapshot of
build/ per run, like tests/harness.py), backs up a ``logical`` source through the signed webhook
and times it from the trigger to the committed job. It prints the machine, then per size: seconds,
microseconds per element, the most rows one page touched and all rows the export touched (the
emulator's counters), and the slope between sizes (time ratio / size ratio: about 1 is linear).

``--legacy`` also pages each graph from Python with the old element id statement (no Worker),
counting the rows the emulator touched, to show the quadratic cost it replaces (bounded by
``--legacy-max``, default 100000 nodes).

Usage (the Worker must be built first: bash scripts/build.sh):
  python3 bench/aura_paging.py [--sizes 1000,10000,100000,1000000] [--page-size 1000] [--legacy]
Every process started here is stopped at the end, on Ctrl-C and on errors too. The emulator is
Python: its seeding alone takes about a minute per million nodes, and each size gets a timeout of
``--timeout`` seconds (default 3600); a size that does not finish is reported as such.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import (AURA_ID, AURA_INSTANCE, AURA_SECRET, AURA_SECRETS, NEO4J_PASSWORD, AuraEmulator,  # noqa: E402
                     Emulator, Ferry, aura_source)

sys.path.insert(0, str(ROOT / "bench"))
from transfer import machine  # noqa: E402  (the same machine lines as the transfer benchmark)

LEGACY_NODES = ("MATCH (n) WHERE elementId(n) > $after RETURN elementId(n) AS id, labels(n) AS labels, "
                "properties(n) AS props ORDER BY id LIMIT $limit")


def legacy_rows_touched(emulator: AuraEmulator, page_size: int) -> tuple[int, float]:
    """Pages the seeded nodes with the element id statement; rows the emulator touched, seconds."""
    auth = "Basic " + base64.b64encode(f"neo4j:{NEO4J_PASSWORD}".encode()).decode()
    before = emulator.state()["rows_touched"]
    after, started = "", time.monotonic()
    while True:
        body = json.dumps({"statement": LEGACY_NODES, "parameters": {"after": after, "limit": page_size}}).encode()
        req = urllib.request.Request(f"{emulator.url}/db/neo4j/query/v2", data=body, method="POST",
                                     headers={"authorization": auth, "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            values = json.loads(resp.read())["data"]["values"]
        if values:
            after = values[-1][0]
        if len(values) < page_size:
            break
    return emulator.state()["rows_touched"] - before, time.monotonic() - started


class SeededAura(AuraEmulator):
    """The Aura emulator with a start-up wait that fits seeding a large graph (about a minute per
    million elements here)."""

    def __init__(self, workdir: Path, nodes: int, rels: int, ready_timeout: float):
        args = ["--client-id", AURA_ID, "--client-secret", AURA_SECRET, "--instance", AURA_INSTANCE,
                "--db-user", "neo4j", "--db-password", NEO4J_PASSWORD, "--nodes", str(nodes), "--rels", str(rels)]
        Emulator.__init__(self, workdir, args, "aura-emulator.log", ready_timeout=ready_timeout)


def run(size: int, args, work: Path) -> dict:
    (work / f"emu-{size}").mkdir(parents=True, exist_ok=True)
    emulator = SeededAura(work / f"emu-{size}", size, 2 * size, ready_timeout=60 + size / 2000)
    ferry = None
    try:
        source = aura_source("graph", emulator, mode="logical", page_size=args.page_size)
        ferry = Ferry(work / f"ferry-{size}", [source], secrets=AURA_SECRETS)
        before = emulator.state()
        started = time.monotonic()
        job = ferry.webhook_job("graph", timeout=args.timeout)
        seconds = time.monotonic() - started
        after = emulator.state()
        result = {"size": size, "phase": job["phase"], "seconds": seconds,
                  "page_touched_max": after["page_touched_max"],
                  "rows_touched": after["rows_touched"] - before["rows_touched"], "warnings": job.get("warnings", [])}
        if args.legacy and size <= args.legacy_max:
            result["legacy_rows"], result["legacy_seconds"] = legacy_rows_touched(emulator, args.page_size)
        return result
    finally:
        if ferry is not None:
            ferry.stop()
        emulator.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="node counts (relationships: twice that)")
    p.add_argument("--page-size", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--legacy", action="store_true", help="also count the rows element id paging touches")
    p.add_argument("--legacy-max", type=int, default=100000)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for line in machine():
        print(line)
    print(f"page_size {args.page_size}; relationships = 2 x nodes; times include the emulator's answers")
    print(f"{'nodes':>9} {'elements':>9} {'seconds':>9} {'us/elem':>8} {'page max':>9} {'rows read':>10} "
          f"{'slope':>6} {'legacy rows':>12}")
    previous = None
    with tempfile.TemporaryDirectory(prefix="ferry-aura-bench-") as tmp:
        for size in sizes:
            try:
                r = run(size, args, Path(tmp))
            except (AssertionError, RuntimeError, TimeoutError, OSError) as exc:
                print(f"{size:>9} did not finish: {exc}")
                break
            elements = 3 * size
            slope = ""
            if previous is not None and r["phase"] == "committed":
                slope = f"{(r['seconds'] / previous['seconds']) / (size / previous['size']):.2f}"
            legacy = str(r.get("legacy_rows", "")) or "-"
            print(f"{size:>9} {elements:>9} {r['seconds']:>9.1f} {r['seconds'] / elements * 1e6:>8.1f} "
                  f"{r['page_touched_max']:>9} {r['rows_touched']:>10} {slope:>6} {legacy:>12}"
                  + ("" if r["phase"] == "committed" else f"  ({r['phase']})"))
            if r["warnings"]:
                print("  warnings:", "; ".join(r["warnings"]))
            if r["phase"] == "committed":
                previous = r
    return 0


if __name__ == "__main__":
    sys.exit(main())
