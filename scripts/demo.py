"""The demo behind scripts/demo.sh: one backup of each sample source, then a listing of R2."""

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import D1Emulator, Ferry, d1_source  # noqa: E402


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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    print(f"working directory: {work}")
    emulator = D1Emulator(work, {"shop-db-uuid": sample_database(work / "shop.sqlite")})
    print(f"D1 emulator on {emulator.url} (a real SQLite database behind it)")
    sources = [d1_source("shop", emulator, "shop-db-uuid", schedule="0 3 * * *")]
    ferry = Ferry(work / "ferry", sources)
    print(f"Ferry under wrangler dev on {ferry.http.base} (state in {ferry.persist})")
    try:
        for source in sources:
            status, _, payload = ferry.webhook(source["name"])
            if status != 202:
                print(f"{source['name']}: trigger refused: HTTP {status} {payload}")
                return 1
            job_id = payload["job"]["id"]
            print(f"{source['name']}: started job {job_id} (signed webhook)")
            last = None
            deadline = time.time() + 120
            while time.time() < deadline:
                job = ferry.job(job_id)
                if job["phase"] != last:
                    print(f"  {job['phase']}")
                    last = job["phase"]
                if job["phase"] in ("committed", "failed"):
                    break
                time.sleep(0.2)
            if job["phase"] != "committed":
                print(f"  failed: {job.get('error')}")
                return 1
        print("\nWhat landed in R2 (bucket ferry-backups, local):")
        for source in sources:
            for manifest in ferry.backups(source["name"]):
                folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
                print(f"  {folder}  ({manifest['trigger']}, {manifest['started_at']} → {manifest['finished_at']})")
                for art in manifest["artifacts"]:
                    print(f"    {art['key']}\n      size {art['size']} bytes, sha256 {art['sha256']}")
                print(f"    {folder}manifest.json")
        return 0
    finally:
        ferry.stop()
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
