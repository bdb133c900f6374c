"""The demo behind scripts/demo.sh: one backup of a source of every kind, then a listing of R2.

Stand-in providers are the emulators under tests/emulators/: D1 with a real SQLite database
behind it, Dgraph Cloud, Neo4j Aura (a 2,000-node graph) and Liferay DXP Cloud. Only the standard
library is needed (the harness and the emulators are plain Python); the Worker is the bundle that
scripts/build.sh put in build/.

    python3 scripts/demo.py                   the backups and the listing, then everything stops
    python3 scripts/demo.py --serve           then the emulators and the Worker keep running for
                                              the dashboard (its URL and API token are printed)
                                              until Ctrl-C or SIGTERM, which stop them all (exit 0)
    python3 scripts/demo.py --workdir DIR     keep the data, Ferry's local state and the logs in
                                              DIR (new or empty) instead of a new temp folder
"""

import argparse
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
from harness import (  # noqa: E402
    API_TOKEN, AURA_SECRETS, DGRAPH_SECRETS, DXP_SECRETS, AuraEmulator, D1Emulator, DgraphEmulator, DxpEmulator,
    Ferry, aura_source, d1_source, dgraph_source, dxp_source,
)

# Every child the demo starts (emulators, wrangler dev), each in its own process group, so that
# stopping reaches all of them, even one whose start was interrupted half-way.
CHILDREN: list = []


class TrackedProcess(harness.Process):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CHILDREN.append(self)


harness.Process = TrackedProcess  # what the emulators and Ferry start their children with

# The DXP source copies in 5 MiB parts and, under --serve, its emulator sends 2 MiB/s: its 12 MiB
# volume takes a few seconds, long enough to watch the dashboard's progress bar move.
DXP_THROTTLE_KIB_PER_S = 2048


def sample_database(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, email TEXT UNIQUE);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id),
                             total REAL, placed_at TEXT);
        CREATE INDEX idx_orders_customer ON orders(customer_id);
    """)
    for i in range(1, 501):
        db.execute("INSERT INTO customers (name, email) VALUES (?, ?)", (f"Customer {i}", f"c{i}@example.com"))
        db.execute("INSERT INTO orders (customer_id, total, placed_at) VALUES (?, ?, ?)",
                   (i, round(i * 3.7, 2), f"2026-11-{i % 28 + 1:02d}T10:00:00Z"))
    db.commit()
    db.close()
    return path


def wait(ferry: Ferry, job_id: str) -> dict:
    last, job = None, {}
    deadline = time.time() + 180
    while time.time() < deadline:
        job = ferry.job(job_id)
        if job["phase"] != last:
            print(f"  {job['phase']}")
            last = job["phase"]
        if job["phase"] in ("committed", "failed", "skipped"):
            break
        time.sleep(0.3)
    return job


def group_running(pgid: int) -> bool:
    """Whether a process of this process group is still running (a zombie is not; Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_children() -> None:
    """Stops the Worker and every emulator (SIGTERM to each process group, SIGKILL after 10 s), and
    waits until no process of theirs is left: workerd runs in wrangler's group."""
    groups = []
    for child in reversed(CHILDREN):  # the Worker first: it started last
        groups.append(child.proc.pid)
        child.stop()
    deadline = time.time() + 10
    for pgid in groups:
        while group_running(pgid) and time.time() < deadline:
            time.sleep(0.1)
        if group_running(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGINT (Ctrl-C) and SIGTERM stop the demo alike


def workdir(arg: Path | None) -> Path:
    if arg is None:
        return Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    arg.mkdir(parents=True, exist_ok=True)
    if any(arg.iterdir()):
        sys.exit(f"--workdir {arg}: not empty (the demo starts from a new or empty folder)")
    return arg.resolve()


def back_up_everything(ferry: Ferry, sources: list, dxp: DxpEmulator, serve: bool) -> int:
    for source in sources:
        body = b"{}"
        if serve and source["kind"] == "dxp":
            # The older of the DXP service's two backups, so that "Back up now" has a newer one.
            older = dxp.backup(0)["backupId"]
            body = json.dumps({"backup_id": older}).encode()
            print(f"{source['name']}: copying the older DXP backup {older}, so that \"Back up now\" has a newer one")
        status, _, payload = ferry.webhook(source["name"], body=body)
        if status != 202:
            print(f"{source['name']}: trigger refused: HTTP {status} {payload}")
            return 1
        print(f"{source['name']} ({source['kind']}): job {payload['job']['id']} started by a signed webhook")
        job = wait(ferry, payload["job"]["id"])
        if job["phase"] != "committed":
            print(f"  {job['phase']}: {job.get('error') or job.get('note')}")
            return 1
    print("\nWhat landed in R2 (bucket ferry-backups, local):")
    for source in sources:
        for manifest in ferry.backups(source["name"]):
            print(f"  {source['name']} ({manifest['kind']}), job {manifest['job_id']}, "
                  f"{manifest['started_at']} → {manifest['finished_at']}")
            snapshot = manifest["provider"].get("snapshot") if isinstance(manifest["provider"], dict) else None
            if snapshot:
                print(f"    Aura snapshot {snapshot['snapshot_id']} {snapshot['status']} at {snapshot['timestamp']} (kept by Aura)")
            for art in manifest["artifacts"]:
                extra = ""
                if art.get("details"):
                    extra = f", {art['details']['nodes']} nodes, {art['details']['relationships']} relationships"
                print(f"    {art['key']}\n      {art['size']} bytes in {art['parts']} part(s), sha256 {art['sha256']}{extra}")
            folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] if manifest["artifacts"] else source["name"] + "/…"
            print(f"    {folder}/manifest.json")
    return 0


def serve(ferry: Ferry, dxp: DxpEmulator) -> int:
    """Keeps everything running for the dashboard until Ctrl-C or SIGTERM (KeyboardInterrupt)."""
    dxp.control(throttle_kib_per_s=DXP_THROTTLE_KIB_PER_S)
    print(f"""
The emulators and the Worker keep running. Open the dashboard and sign in with the API token:
  dashboard: {ferry.http.base}/
  API token: {API_TOKEN}
What to try:
  - "Back up now" on intranet (DXP, paced at {DXP_THROTTLE_KIB_PER_S // 1024} MiB/s): the bar moves, then "backup committed".
  - "Backups" on a card lists its files: a button downloads one (its sha256 is in the tooltip).
  - "Drill now" on shop (D1): its newest backup restored into a scratch database and checked.
Press Ctrl-C to stop the Worker and the emulators.""")
    while True:
        time.sleep(0.5)
        for child in CHILDREN:
            if not child.alive():
                print(f"\nA child exited unexpectedly: the end of its log, {child.log_path}:\n{child.tail(20)}")
                return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ferry's demo against local emulators.")
    parser.add_argument("--serve", action="store_true",
                        help="after the backups, keep the emulators and the Worker running for the dashboard "
                             "until Ctrl-C or SIGTERM")
    parser.add_argument("--workdir", type=Path,
                        help="a new or empty folder for the data, Ferry's local state and the logs "
                             "(default: a new temp folder)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # lines show up at once through a pipe too
    # Ctrl-C and SIGTERM stop everything, even when started with SIGINT ignored (`&` in a script).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    work = workdir(args.workdir)
    serving = stopping = False
    try:
        print(f"working directory: {work}")
        d1 = D1Emulator(work, {"shop-db-uuid": sample_database(work / "shop.sqlite")})
        dgraph = DgraphEmulator(work)
        aura = AuraEmulator(work, nodes=2000, rels=4000, snapshot_polls=1)
        dxp = DxpEmulator(work, volume_mib=12, backups=2)
        for e in (d1, dgraph, aura, dxp):
            print(f"{e.script:10} emulator on {e.url}")
        sources = [
            # drill_schedule: also shows the dashboard's "Drill now" (a scratch D1 database).
            d1_source("shop", d1, "shop-db-uuid", schedule="0 3 * * *", drill_schedule="0 6 * * 1"),
            dgraph_source("catalog-graph", dgraph, schedule="15 3 * * *"),
            aura_source("social-graph", aura, schedule="30 3 * * *"),
            dxp_source("intranet", dxp, schedule="45 3 * * *", part_size_mib=5, parts_in_flight=1),
        ]
        ferry = Ferry(work / "ferry", sources, secrets={**DGRAPH_SECRETS, **AURA_SECRETS, **DXP_SECRETS})
        print(f"Ferry under wrangler dev on {ferry.http.base} (state in {ferry.persist})\n")
        code = back_up_everything(ferry, sources, dxp, args.serve)
        if code or not args.serve:
            return code
        serving = True
        return serve(ferry, dxp)
    except KeyboardInterrupt:
        stopping = True
        print("\nstopping the Worker and the emulators…")
        return 0 if serving else 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_children()
        if serving or stopping:
            print(f"stopped: the Worker and the emulators are gone (their logs and data: {work})")


if __name__ == "__main__":
    sys.exit(main())
