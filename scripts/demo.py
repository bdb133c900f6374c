"""The demo behind scripts/demo.sh: one backup of a source of every kind, then a listing of R2.

Stand-in providers are the emulators under tests/emulators/: D1 with a real SQLite database
behind it, Dgraph Cloud, Neo4j Aura (a 2,000-node graph) and Liferay DXP Cloud.
"""

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402
    AURA_SECRETS, DGRAPH_SECRETS, DXP_SECRETS, AuraEmulator, D1Emulator, DgraphEmulator, DxpEmulator, Ferry,
    aura_source, d1_source, dgraph_source, dxp_source,
)


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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    print(f"working directory: {work}")
    d1 = D1Emulator(work, {"shop-db-uuid": sample_database(work / "shop.sqlite")})
    dgraph = DgraphEmulator(work)
    aura = AuraEmulator(work, nodes=2000, rels=4000, snapshot_polls=1)
    dxp = DxpEmulator(work, volume_mib=12, backups=2)
    emulators = [d1, dgraph, aura, dxp]
    for e in emulators:
        print(f"{e.script:10} emulator on {e.url}")
    sources = [
        d1_source("shop", d1, "shop-db-uuid", schedule="0 3 * * *"),
        dgraph_source("catalog-graph", dgraph, schedule="15 3 * * *"),
        aura_source("social-graph", aura, schedule="30 3 * * *"),
        dxp_source("intranet", dxp, schedule="45 3 * * *"),
    ]
    ferry = Ferry(work / "ferry", sources, secrets={**DGRAPH_SECRETS, **AURA_SECRETS, **DXP_SECRETS})
    print(f"Ferry under wrangler dev on {ferry.http.base} (state in {ferry.persist})\n")
    try:
        for source in sources:
            status, _, payload = ferry.webhook(source["name"])
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
    finally:
        ferry.stop()
        for e in emulators:
            e.stop()


if __name__ == "__main__":
    sys.exit(main())
